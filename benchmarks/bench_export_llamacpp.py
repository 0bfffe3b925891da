"""llama.cpp vs lorakit on 20 prompts: exported adapter GGUFs and merged GGUFs of the default model.

For each adapter (a plain LoRA r=16 alpha=32, and rsLoRA r=8 alpha=16 with a rank pattern; B drawn
N(0, 0.02) as stand-ins for trained weights) it runs lorakit (fp32 transformers) and llama.cpp
(llama-cpp-python, 1 thread) on the same token ids and reports how many of the 20 greedy continuations
(8 tokens) are identical and the max |first-token logit difference| (median and max over prompts), for:
the shipped Q4_1 base + exported adapter; the merged GGUF in q8_0 and f32 (F32 KV cache); the base
dequantized to F32 + exported adapter (F32 KV); and that base + the adapter converted naively (alpha/r).

    PYTHONPATH=src:tests/export python benchmarks/bench_export_llamacpp.py [--prompts 20] [--new 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import lorakit
from lorakit.adapters import manage
from lorakit.export import export_adapter_gguf, export_merged_gguf, lora_pairs, write_lora_gguf, write_merged_gguf
from lorakit.models.default import default_gguf_file
from llama_check import PROMPTS, agreement, clear_adapter, llama, llama_run, lorakit_run, set_adapter

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "lora r16 a32": dict(r=16, lora_alpha=32),
    "rslora r8 a16 +rank_pattern": dict(r=8, lora_alpha=16, use_rslora=True,
                                        rank_pattern={"v_proj": 4, "down_proj": 12}),
}


def row(label, want, got, n):
    same, diffs = agreement(want, got)
    print(f"  {label:34s} same greedy {same:2d}/{n}   |dlogit| median {np.median(diffs):.2e} max {max(diffs):.2e}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new", type=int, default=8)
    a = ap.parse_args()
    base = default_gguf_file()
    tmp = Path(tempfile.mkdtemp(prefix="bench-export-"))
    t0 = time.time()
    model, tok = lorakit.load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    base32 = write_merged_gguf(model, base, tmp / "base-f32.gguf", "f32")
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:a.prompts]]
    for seed, (label, kw) in enumerate(ADAPTERS.items()):
        model, _ = lorakit.load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
        lorakit.add_adapter(model, lorakit.LoraConfig(target_modules=TARGETS, **kw))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in manage.lora_layers(model):
                layer.lora_B["default"].normal_(0, 0.02, generator=g)
        want = [lorakit_run(model, i, a.new) for i in ids]
        adapter = export_adapter_gguf(model, tmp / "adapter.gguf", base_gguf=base)
        naive = write_lora_gguf(tmp / "naive.gguf", "llama", [(p.name, p.A, p.B) for p in lora_pairs(model)],
                                float(kw["lora_alpha"]))
        print(f"{label}:", flush=True)
        for llm_path, f32, files in ((base, False, [("Q4_1 base + adapter", adapter)]),
                                     (base32, True, [("F32 base + adapter (F32 KV)", adapter),
                                                     ("F32 base + naive alpha/r (F32 KV)", naive)])):
            llm = llama(llm_path, f32_kv=f32)
            for name, path in files:
                ad = set_adapter(llm, path)
                row(name, want, [llama_run(llm, i, a.new) for i in ids], len(ids))
                clear_adapter(llm, ad)
        merged = manage.merge_and_unload(model, safe_merge=True)
        for quant, f32 in (("q8_0", False), ("f32", True)):
            path = write_merged_gguf(merged, base, tmp / f"merged-{quant}.gguf", quant)
            row(f"merged {quant}" + (" (F32 KV)" if f32 else ""), want,
                [llama_run(llama(path, f32_kv=f32), i, a.new) for i in ids], len(ids))
            path.unlink()
    print(f"total {time.time() - t0:.0f} s; scratch {tmp}")


if __name__ == "__main__":
    main()
