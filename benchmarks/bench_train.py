"""End-to-end training throughput: lorakit's training path vs PEFT with a standard padded loop.

Same model, same LoRA hyperparameters, same examples, same number of epochs, one run. Each side
runs in its own subprocess so peak memory is its own (RSS on CPU, CUDA max allocated on GPU).

  lorakit: the trainer's batches: flat (each batch's examples end to end in one unpadded row, attention
           per example: batching.collate(flat=True), attention.flat_attention; --no-flat for padded),
           from packed rows (--max-tokens) or length-grouped examples (--max-tokens 0); loss on
           assistant tokens only, logits only at labelled positions (fused linear cross-entropy),
           the trainer's rebuilt activations, AdamW.
  PEFT:    get_peft_model + the usual loop: random batches padded to the longest, model(labels=...)
           (full logits over every position), AdamW.

Data: `--data synthetic` (default), a chat set with realistic length variation (long prompts, short
answers) on a random-init model of the chosen shape; or `--data demo`, the demo's date-normalisation
set (examples/demo, 400 examples) encoded with the real SmolLM2-135M-Instruct's chat template, on that
model. Both sides see the same token ids and the same loss mask.
Reports real (non-padding) tokens per second, eval loss after training, and peak memory.

    python benchmarks/bench_train.py                    # CPU, SmolLM2-135M-shaped random Llama
    python benchmarks/bench_train.py --device cuda      # GPU, bf16 autocast
    python benchmarks/bench_train.py --data demo --examples 400 --batch-size 8 --max-tokens 384
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # Llama-style shapes: (hidden, intermediate, layers, heads, kv heads, vocab)
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-1b": (2048, 8192, 16, 32, 8, 128256),
}


def make_examples(n: int, seed: int, vocab: int) -> list[dict]:
    """Chat-like examples: prompt 40-600 tokens (log-normal), answer 8-160; labels only on the answer."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = int(min(600, max(40, rng.lognormvariate(5.0, 0.6))))
        a = int(min(160, max(8, rng.lognormvariate(3.6, 0.6))))
        ids = [rng.randrange(3, vocab) for _ in range(p + a)]
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM
    h, i, n, heads, kv, vocab = SHAPES[shape]
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def demo_data(n: int, device: str, dtype: torch.dtype):
    """The real default model and the demo's examples (prompt-masked through its chat template)."""
    from lorakit import data, models
    model, tok = models.load_model(models.DEFAULT_MODEL, dtype=dtype, device=device)
    root = Path(__file__).resolve().parent.parent / "examples" / "demo"
    encode = lambda path: [data.encode(r, tok, 96) for r in data.load_records(root / path)]  # noqa: E731
    return model, encode("train.jsonl")[:n], encode("eval.jsonl")


def peak_memory(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux


def run_side(args) -> dict:
    """One side (lorakit or peft) in this process: train one epoch, then eval loss."""
    torch.set_num_threads(args.threads)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.data == "demo":
        model, train_set, eval_set = demo_data(args.examples, device, dtype)
    else:
        vocab = SHAPES[args.shape][5]
        train_set, eval_set = make_examples(args.examples, 0, vocab), make_examples(32, 1, vocab)
        model = build(args.shape, device, dtype)
    config_kw = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    if args.side == "peft":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(**config_kw))
    else:
        import lorakit
        lorakit.add_adapter(model, lorakit.LoraConfig(**config_kw))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters in fp32 on both sides
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batches = list(_batches(args.side, train_set, args.batch_size, args.max_tokens, args.flat))
    real_tokens = sum(len(e["input_ids"]) for e in train_set)
    model.train()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    from lorakit.data import batching
    from lorakit.models import attention
    for batch in batches:
        batch = batching.to_device(batch, device)
        with attention.for_batch(model, batch):  # as the trainer: over backward too
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = _loss(args.side, model, batch)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"side": args.side, "tokens_per_s": real_tokens / seconds, "seconds": seconds, "steps": len(batches),
            "padded_tokens": sum(int(b["input_ids"].numel()) for b in batches), "real_tokens": real_tokens,
            "eval_loss": _eval(args.side, model, eval_set, device), "peak_mib": peak_memory(device)}


def _batches(side, examples, batch_size, max_tokens, flat):
    from lorakit.data import batching
    if side == "peft":  # the usual: random order, pad to the longest in the batch
        order = list(range(len(examples)))
        random.Random(0).shuffle(order)
        for i in range(0, len(order), batch_size):
            yield batching.collate([examples[j] for j in order[i:i + batch_size]], pad_id=0)
        return
    if not max_tokens:  # lorakit without packing: the trainer's default, length-grouped padded batches
        yield from batching.batches(examples, batch_size, seed=0, pad_id=0, group_by_length=True, flat=flat)
        return
    rows = batching.pack(examples, max_tokens)  # lorakit: full rows, no padding
    mean_len = sum(len(e["input_ids"]) for e in examples) / len(examples)
    per_batch = max(1, round(batch_size * mean_len / max_tokens))  # about the same tokens per step as PEFT's
    yield from batching.batches(rows, per_batch, seed=0, pad_id=0, flat=flat)


def _loss(side, model, batch):
    if side == "peft":
        return model(**batch).loss
    from lorakit.layers import recompute
    from lorakit.eval.losses import token_loss_sum
    with recompute.rebuilt_activations():  # as the trainer's step does
        loss_sum, n = token_loss_sum(model, batch)
    return loss_sum / max(n, 1)


@torch.no_grad()
def _eval(side, model, examples, device) -> float:
    from lorakit.data import batching
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), 8):
        batch = {k: v.to(device) for k, v in batching.collate(examples[i:i + 8], pad_id=0).items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1][keep], labels[keep], reduction="sum"))
        count += int(keep.sum())
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="smollm2-135m", choices=list(SHAPES))
    p.add_argument("--data", default="synthetic", choices=["synthetic", "demo"])
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=768,
                   help="packed row length (lorakit; with --no-flat attention cost grows with it); "
                   "0: no packing, length-grouped batches (the trainer's default)")
    p.add_argument("--flat", action=argparse.BooleanOptionalAction, default=True,
                   help="lorakit's flat batches (train.flat_batches, on by default in the trainer)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--side", choices=["lorakit", "peft"], help=argparse.SUPPRESS)
    p.add_argument("--out", help="write the markdown table here too")
    args = p.parse_args()
    if args.side:
        print(json.dumps(run_side(args)))
        return
    results = {}
    for side in ("peft", "lorakit"):
        cmd = [sys.executable, __file__, "--side", side] + [a for a in sys.argv[1:] if a != "--out" and not a.endswith(".md")]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{side} failed:\n{out.stderr[-3000:]}")
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    table = _table(results, args)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


def _table(r: dict, args) -> str:
    lk, pf = r["lorakit"], r["peft"]
    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    how = (f"packed {args.max_tokens}-token rows" if args.max_tokens else "length-grouped batches") + (
        ", flat" if args.flat else ", padded")
    what = ("SmolLM2-135M-Instruct (real weights), demo date data" if args.data == "demo"
            else f"{args.shape} (random init), synthetic chat data")
    lines = [f"End-to-end training, {what}, r=16 all-linear, {lk['real_tokens']} real tokens, "
             f"1 epoch, device {args.device} ({dev}), torch {torch.__version__}",
             "command: python benchmarks/bench_train.py " + " ".join(a for a in sys.argv[1:]), "",
             f"| | PEFT (padded loop) | lorakit ({how}, label-only loss) | ratio |", "|---|---|---|---|",
             f"| real tokens/s | {pf['tokens_per_s']:.0f} | {lk['tokens_per_s']:.0f} | "
             f"{lk['tokens_per_s'] / pf['tokens_per_s']:.2f}x |",
             f"| tokens computed (incl. padding) | {pf['padded_tokens']} | {lk['padded_tokens']} | |",
             f"| optimizer steps | {pf['steps']} | {lk['steps']} | |",
             f"| eval loss after 1 epoch | {pf['eval_loss']:.4f} | {lk['eval_loss']:.4f} | |",
             f"| peak memory (MiB, {'CUDA max allocated' if args.device == 'cuda' else 'process RSS'}) | "
             f"{pf['peak_mib']:.0f} | {lk['peak_mib']:.0f} | {lk['peak_mib'] / pf['peak_mib']:.2f}x |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
