"""Distributed training (issue 18): bytes moved between ranks per optimizer step, and step time, 1 vs 2
processes, on lorakit's own engine (train/distributed.py: DDP over the adapter, FSDP2 fully_shard).

    python benchmarks/bench_distributed.py [--repeats 5] [--layers 4] [--device cpu|cuda] [--out FILE]

Part 1, bytes (SmolLM2-135M's shape, random init, fp32, LoRA r=16 on the 7 projections, 2 processes):
every torch.distributed collective of one step is counted (payload bytes, and what a rank sends and
receives: ring all-reduce 2(N-1)/N of the payload, all-gather / reduce-scatter (N-1)/N): DDP with the
adapter, FSDP2 with the adapter, and DDP full fine-tuning (every parameter trainable: what the base
would cost if it were synchronised).
Part 2, time: one optimizer step over a global batch of 8 examples x 64 tokens (the 135M shape cut to
--layers decoder layers, r=16 all-linear): 1 process x 1 thread, 1 process x 2 threads, 2 processes x
1 thread (ddp, fsdp; batch_size 4 each); medians over --repeats steps after one warm-up step.
Each configuration is its own `torchrun --standalone` launch (gloo on CPU, NCCL on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _counting():
    """Wrap the collectives DDP (through lorakit's sum hook) and FSDP2 call; returns the tally."""
    import torch.distributed as dist
    tally = {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0, "calls": 0}

    def wrap(name, kind, key, position):
        real = getattr(dist, name)

        def counted(*args, **kwargs):
            t = kwargs[key] if key in kwargs else args[position]
            tally[kind] += t.numel() * t.element_size()
            tally["calls"] += 1
            return real(*args, **kwargs)
        setattr(dist, name, counted)
    wrap("all_reduce", "all_reduce", "tensor", 0)
    wrap("all_gather_single", "all_gather", "output_tensor", 0)  # the gathered (full) size
    wrap("reduce_scatter_single", "reduce_scatter", "input", 1)  # the full size, before scattering
    return tally


def worker(args) -> None:
    """One rank: build, wrap, run steps; rank 0 writes {seconds: [...], bytes: {...}} to args.result."""
    import torch
    torch.set_num_threads(args.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.train import distributed, loop
    from lorakit.train.optim import build_optimizer
    device = torch.device(args.device)
    ranks = distributed.start(args.mode if args.mode != "full" else "ddp", 600, device)
    device = ranks.device(device)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMOL, "num_hidden_layers": args.layers})).to(device)
    if args.mode == "full":
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
    tally = _counting() if ranks.world > 1 else None
    ranks.wrap(model, torch.bfloat16 if device.type == "cuda" else None)
    optimizer = build_optimizer(model, 1e-4) if args.mode != "full" else torch.optim.SGD(model.parameters(), lr=0)
    per_rank = args.global_batch // ranks.world
    g = torch.Generator().manual_seed(1 + ranks.rank)

    def micro():
        while True:
            ids = torch.randint(0, SMOL["vocab_size"], (per_rank, args.tokens), generator=g)
            yield {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}, ids.numel()
    batches, seconds, counted = micro(), [], None
    autocast = torch.bfloat16 if device.type == "cuda" else None
    for step in range(args.repeats + 1):
        if tally is not None and step == 1:
            before = dict(tally)
        started = time.perf_counter()
        loop.accumulate(model, batches, 1, device, autocast, True, ranks if ranks.world > 1 else None)
        loop.clip(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        if tally is not None and step == 1:
            counted = {k: tally[k] - before[k] for k in tally}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if ranks.main:
        Path(args.result).write_text(json.dumps({"seconds": seconds[1:], "bytes": counted, "world": ranks.world,
                                                 "trainable": trainable}))
    ranks.close()


def launch(args, mode: str, procs: int, threads: int, layers: int, repeats: int, tokens: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               __file__, "--worker", "--mode", mode, "--threads", str(threads), "--layers", str(layers),
               "--repeats", str(repeats), "--device", args.device, "--result", str(result),
               "--tokens", str(tokens), "--global-batch", str(batch)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        if done.returncode != 0:
            raise SystemExit(f"{mode} x{procs} failed:\n{done.stderr[-3000:]}")
        return json.loads(result.read_text())


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--mode", default="ddp")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--result")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", default="benchmarks/results/distributed.md")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    started = time.time()
    lines = ["# bench_distributed", "", f"`python benchmarks/bench_distributed.py --repeats {args.repeats} "
             f"--layers {args.layers} --device {args.device}`", "",
             f"- machine: {os.cpu_count()} logical CPUs, load average at start "
             f"{' '.join(open('/proc/loadavg').read().split()[:3])}", "",
             "## Bytes per optimizer step, per rank, 2 processes (SmolLM2-135M shape, fp32, r=16 x 7 projections)",
             "", "| setup | trainable params | all-reduce payload | all-gather | reduce-scatter | sent+received "
             "per rank |", "|---|---|---|---|---|---|"]
    for mode in ("ddp", "fsdp", "full"):
        r = launch(args, mode, 2, 1, SMOL["num_hidden_layers"], 1, 16, 2)  # bytes do not depend on the batch
        b, n = r["bytes"], r["world"]
        wire = 2 * (n - 1) / n * b["all_reduce"] + (n - 1) / n * (b["all_gather"] + b["reduce_scatter"])
        name = {"ddp": "DDP, LoRA (adapter grads only)", "fsdp": "FSDP2, LoRA (base sharded)",
                "full": "DDP, full fine-tuning (every grad)"}[mode]
        lines.append(f"| {name} | {r['trainable']:,} | {_mb(b['all_reduce'])} | {_mb(b['all_gather'])} | "
                     f"{_mb(b['reduce_scatter'])} | {_mb(wire)} |")
    lines += ["", f"## Step time, global batch {args.global_batch} x {args.tokens} tokens ({args.layers} decoder "
              "layers of the 135M shape, r=16 all-linear)", "",
              "| setup | median s/step | min | ratio to 1 process x 1 thread |", "|---|---|---|---|"]
    base = None
    for label, mode, procs, threads in (("1 process x 1 thread", "ddp", 1, 1), ("1 process x 2 threads", "ddp", 1, 2),
                                        ("2 processes x 1 thread, ddp", "ddp", 2, 1),
                                        ("2 processes x 1 thread, fsdp", "fsdp", 2, 1)):
        s = launch(args, mode, procs, threads, args.layers, args.repeats, args.tokens, args.global_batch)["seconds"]
        med = statistics.median(s)
        base = base or med
        lines.append(f"| {label} | {med:.3f} | {min(s):.3f} | {med / base:.2f} |")
    lines += ["", f"(bench wall time {time.time() - started:.0f} s)"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
