"""QLoRA vs LoRA: training step time and peak memory on a SmolLM2-135M-shaped random Llama.

    PYTHONPATH=src python benchmarks/bench_qlora.py                       # CPU, fp32, all 30 layers
    PYTHONPATH=src python benchmarks/bench_qlora.py --layers 8            # fewer layers when time is short
    PYTHONPATH=src python benchmarks/bench_qlora.py --device cuda         # GPU: bf16 model and compute

The model has SmolLM2-135M's shape (hidden 576, 30 layers, intermediate 1536, 9 heads, 3 kv heads, vocab
49152, tied embeddings) with random weights from LlamaConfig: nothing is downloaded. It is saved once to a
temporary folder and every variant loads that same checkpoint the way a user would:
    lora        lorakit LoRA on the fp base (fp32 on CPU, bf16 on CUDA)
    qlora       lorakit LoRA on the base loaded with quantization_config=nf4 + double quantisation
    peft-qlora  PEFT LoRA on the same nf4 base
r=16, alpha=32, all linear layers but the output head; AdamW; batch 4×128 random tokens; the step is
forward + backward + optimizer step. Each variant runs in its own subprocess, so its memory is its own:
peak RSS is sampled every 2 ms during the timed steps (and the warmup, which allocates the optimizer
state); "process max RSS" is ru_maxrss of the worker, which also covers loading. On CUDA the peak is
torch.cuda.max_memory_allocated over the steps. Step time: median over --repeats after --warmup steps.
Prints a markdown table with ratios against lorakit LoRA, and the command that reproduces it.
About 3-4 minutes on a 2-core CPU with the defaults (1 torch thread, 30 layers).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

VARIANTS = ("lora", "qlora", "peft-qlora")
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                    vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
                    rope_theta=100000.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 0 = torch's choice. Default 1: on the shared 2-core machines two "
                        "threads contend with other work and ran 2-3x slower with noisy ratios")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def dtypes(device: str) -> tuple[torch.dtype, torch.dtype]:
    """(model dtype, 4-bit compute dtype): fp32 on CPU, bf16 on CUDA."""
    return (torch.bfloat16, torch.bfloat16) if device == "cuda" else (torch.float32, torch.float32)


# -- the parent: one checkpoint, one subprocess per variant, one table ---------------------------------------

def make_checkpoint(args, directory: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=args.layers, **SMOLLM2_135M))
    model.to(dtypes(args.device)[0]).save_pretrained(directory)


def run_worker(args, variant: str, checkpoint: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--checkpoint", checkpoint,
           "--device", args.device, "--layers", str(args.layers), "--batch", str(args.batch), "--seq",
           str(args.seq), "--rank", str(args.rank), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_qlora_") as ckpt:
        make_checkpoint(args, ckpt)
        results = []
        for v in variants:
            results.append(run_worker(args, v, ckpt))
            print(f"  {v}: median step {results[-1]['step_s']:.3f} s", file=sys.stderr)
    print(table(args, results, time.perf_counter() - started))


# -- the worker: load, wrap, train a few steps, measure ---------------------------------------------------

class PeakRSS:
    """Samples this process's RSS every `every` seconds in a thread (torch ops release the GIL)."""

    def __init__(self, every: float = 0.002):
        import psutil

        self.proc, self.every, self.peak = psutil.Process(), every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every)

    def __enter__(self):
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def load_and_wrap(args, variant: str):
    """The model for `variant`, wrapped with r=args.rank adapters on all linear layers but the head."""
    from transformers import LlamaForCausalLM

    import lorakit
    from lorakit.models import quantize as quant

    dtype, compute = dtypes(args.device)
    kwargs = {"dtype": dtype, "device_map": args.device}
    if variant != "lora":
        kwargs["quantization_config"] = quant.quantization_config("nf4", compute_dtype=compute)
    model = LlamaForCausalLM.from_pretrained(args.checkpoint, **kwargs)
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0)
    if variant == "peft-qlora":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(**lora))
    return lorakit.get_peft_model(model, lorakit.LoraConfig(**lora))


def _release_freed_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed heap pages in RSS otherwise
    except (OSError, AttributeError):
        pass


def worker(args) -> dict:
    from lorakit.models import quantize as quant

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_and_wrap(args, args.worker)
    _release_freed_memory()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq), device=args.device)
    mem = quant.weight_memory_report(model)
    times, losses = [], []
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        rss_setup = rss.peak
        for i in range(args.warmup + args.repeats):
            t0 = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
    return {"variant": args.worker, "step_s": statistics.median(times), "step_times": times,
            "loss_first": losses[0], "loss_last": losses[-1], "trainable": sum(p.numel() for p in params),
            "base_bytes": mem["total_bytes"] - mem["adapter_bytes"], "bits_per_param": mem["bits_per_param"],
            "rss_setup_mib": rss_setup / 2**20, "rss_peak_mib": rss.peak / 2**20,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None,
            "threads": torch.get_num_threads()}


# -- the table ----------------------------------------------------------------------------------------------

def table(args, results: list[dict], elapsed: float) -> str:
    ref = next((r for r in results if r["variant"] == "lora"), results[0])
    cuda = args.device == "cuda"
    mem_key, mem_name = ("cuda_peak_mib", "CUDA peak alloc MiB") if cuda else ("rss_peak_mib", "peak RSS in steps MiB")
    head = (f"| variant | base weights MiB (linear bits/param) | step s (median of {args.repeats}) | × lora | "
            f"{mem_name} | × lora | process max RSS MiB | trainable params | loss first → last |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in results:
        bits = f" ({r['bits_per_param']:.3f})" if r["bits_per_param"] else " (32)" if not cuda else " (16)"
        lines.append(f"| {r['variant']} | {r['base_bytes'] / 2**20:.0f}{bits} | {r['step_s']:.3f} | "
                     f"{r['step_s'] / ref['step_s']:.2f} | {r[mem_key]:.0f} | {r[mem_key] / ref[mem_key]:.2f} | "
                     f"{r['ru_maxrss_mib']:.0f} | {r['trainable']:,} | {r['loss_first']:.3f} → {r['loss_last']:.3f} |")
    dtype = "bf16" if cuda else "fp32"
    cmd = " ".join(["PYTHONPATH=src python benchmarks/bench_qlora.py"] + sys.argv[1:])
    notes = [f"SmolLM2-135M-shaped random Llama, {args.layers} layers, {dtype}, batch {args.batch}×{args.seq}, "
             f"r={args.rank} all-linear, device {args.device}, torch threads {results[0]['threads']}, "
             f"warmup {args.warmup}, total wall time {elapsed:.0f} s.",
             "Base weights: every non-adapter parameter (the tied embedding stays in the model dtype in all "
             "variants); bits/param: the quantized linear layers with their absmax state and code tables.",
             f"Reproduce: `{cmd}`"]
    return "\n".join(lines + [""] + notes)


if __name__ == "__main__":
    main()
