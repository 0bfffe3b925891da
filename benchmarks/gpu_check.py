"""Verify lorakit's CUDA paths on a GPU: bf16 parity with PEFT, QLoRA through bitsandbytes, mixed-adapter
batches, packed rows, the fused loss, and a short bf16 training run. Prints one line per check.

    python benchmarks/gpu_check.py        # needs CUDA; exits non-zero if a check fails
"""

from __future__ import annotations

import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
RESULTS = []


def check(name: str, ok: bool, detail: str) -> None:
    RESULTS.append(ok)
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def tiny(dtype=torch.bfloat16, vocab=512, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).to("cuda", dtype).eval()


def parity_bf16() -> None:
    import peft
    import lorakit
    ids = torch.randint(0, 512, (4, 64), device="cuda")
    for variant in ({}, {"use_dora": True}):
        kw = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, **variant)
        torch.manual_seed(1)
        theirs = peft.get_peft_model(tiny(), peft.LoraConfig(**kw)).eval()
        torch.manual_seed(1)
        ours = lorakit.get_peft_model(tiny(), lorakit.LoraConfig(**kw)).eval()
        with torch.no_grad():
            a, b = ours(ids).logits.float(), theirs(ids).logits.float()
        diff = (a - b).abs().max().item()
        check(f"bf16 logits vs PEFT {variant or 'lora'}", diff <= 2e-2 * a.abs().max().item(),
              f"max |diff| {diff:.3g} (logits max {a.abs().max().item():.3g})")


def qlora_cuda() -> None:
    import bitsandbytes as bnb
    import peft
    import lorakit
    from lorakit.models import quantize as quant
    for kind in ("nf4", "int8"):
        model = quant.quantize_model(tiny(torch.bfloat16).float().to("cuda"), kind)
        layer = model.model.layers[0].self_attn.q_proj
        lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear"))
        ids = torch.randint(0, 512, (4, 64), device="cuda")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        model.train()
        losses = []
        for _ in range(8):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        check(f"QLoRA {kind} on CUDA trains ({type(layer).__name__}, bnb {bnb.__version__})",
              losses[-1] < losses[0], f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    report = quant.weight_memory_report(quant.quantize_model(tiny(torch.float32, layers=4).to("cuda"), "nf4"))
    check("NF4 + double quant bits/param on CUDA", report["bits_per_param"] < 4.3, f"{report['bits_per_param']:.4f}")
    base = quant.quantize_model(tiny(torch.float32).to("cuda"), "nf4")
    torch.manual_seed(3)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False)).eval()
    base2 = quant.quantize_model(tiny(torch.float32).to("cuda"), "nf4")
    torch.manual_seed(3)
    ours = lorakit.get_peft_model(base2, lorakit.LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False)).eval()
    ids = torch.randint(0, 512, (2, 32), device="cuda")
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    check("QLoRA nf4 logits vs PEFT on CUDA", diff < 1e-3, f"max |diff| {diff:.3g}")


def routing_cuda() -> None:
    import lorakit
    model = tiny(torch.float32)
    torch.manual_seed(1)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False), "a")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False), "b", activate=False)
    ids = torch.randint(0, 512, (3, 32), device="cuda")
    with torch.no_grad(), lorakit.adapter_rows(model, ["a", "b", "__base__"]):
        mixed = model(ids).logits
    worst = 0.0
    for i, name in enumerate(["a", "b", None]):
        with torch.no_grad():
            if name is None:
                with lorakit.disable_adapters(model):
                    alone = model(ids[i:i + 1]).logits
            else:
                lorakit.set_adapter(model, name)
                alone = model(ids[i:i + 1]).logits
        worst = max(worst, (alone[0] - mixed[i]).abs().max().item())
    check("mixed-adapter batch equals per-adapter runs (fp32, CUDA)", worst < 1e-4, f"max |diff| {worst:.3g}")


def packing_and_loss_cuda() -> None:
    import lorakit
    from lorakit.data import batching
    from lorakit.eval.losses import token_loss_sum
    model = tiny(torch.bfloat16)
    examples = [{"input_ids": list(range(5, 5 + n)), "labels": [-100] * 3 + list(range(8, 5 + n))} for n in (20, 30, 12)]
    rows = batching.pack(examples, 64)
    packed = batching.collate(rows, pad_id=0, mask_dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(**{k: v.to("cuda") for k, v in packed.items() if k != "labels"}).logits
        alone = model(torch.tensor([examples[1]["input_ids"]], device="cuda")).logits
    # best-fit decreasing packs the 30-token example first, then the 20-token one at 30..49
    with torch.no_grad():
        second = model(torch.tensor([examples[0]["input_ids"]], device="cuda")).logits
    diff = max((out[0, :30].float() - alone[0].float()).abs().max().item(),
               (out[0, 30:50].float() - second[0].float()).abs().max().item())
    check("packed row equals separate run (bf16, sdpa, CUDA)", diff < 0.05, f"max |diff| {diff:.3g}")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    batch = {k: v.to("cuda") for k, v in batching.collate(examples, pad_id=0).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused, n = token_loss_sum(model, batch, fused=True)
        plain, _ = token_loss_sum(model, batch, fused=False)
    rel = abs(fused.item() - plain.item()) / plain.item()
    check("fused label-only loss equals plain loss (bf16, CUDA)", rel < 1e-2, f"rel diff {rel:.2e}")
    from lorakit.models import attention
    flat = batching.to_device(batching.collate(examples, 0, flat=True), "cuda")
    with attention.flat_attention(model), torch.autocast("cuda", dtype=torch.bfloat16):
        flat_loss, _ = token_loss_sum(model, flat)
    rel = abs(flat_loss.item() - fused.item()) / fused.item()
    check("flat batch (per-example sdpa) equals padded batch (bf16, CUDA)", rel < 1e-2, f"rel diff {rel:.2e}")


def bf16_training() -> None:
    import json
    import tempfile
    from pathlib import Path
    from lorakit.train import load_run
    from lorakit.train import train
    from transformers import PreTrainedTokenizerFast
    tmp = Path(tempfile.mkdtemp())
    model = tiny(torch.bfloat16, vocab=512)
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({"[UNK]": 0} | {f"w{i}": i + 1 for i in range(511)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1", pad_token="w2")
    (tmp / "d.jsonl").write_text("".join(json.dumps({"text": " ".join(f"w{(i * j) % 500 + 3}" for j in range(40))}) + "\n"
                                         for i in range(64)))
    cfg = load_run(None, overrides=[f"data.train={tmp / 'd.jsonl'}", f"output_dir={tmp / 'out'}", "train.max_steps=30",
                                    "train.learning_rate=2e-3", "lora.r=8", "data.pack=true", "data.max_length=128"])
    t0 = time.time()
    result = train(cfg, progress=False, model=model, tokenizer=fast)
    rows = [json.loads(x) for x in (tmp / "out/metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss"], rows[-1]["loss"]
    check("trainer on CUDA with bf16 autocast + packing learns", last < first,
          f"loss {first:.3f} -> {last:.3f} in {time.time() - t0:.1f} s, {result.steps} steps")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("no CUDA device")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}")
    for fn in (parity_bf16, qlora_cuda, routing_cuda, packing_and_loss_cuda, bf16_training):
        try:
            fn()
        except Exception as e:  # report and go on: one broken path must not hide the others
            check(fn.__name__, False, f"{type(e).__name__}: {e}")
    sys.exit(0 if all(RESULTS) else 1)
