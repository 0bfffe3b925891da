"""One LoRA training step, lorakit vs PEFT vs the frozen-base floor, over a grid of batch × length.

    python benchmarks/bench_step.py                  # CPU fp32, SmolLM2-135M shape, ~20 min
    python benchmarks/bench_step.py --quick          # 4 layers, small grid: a smoke test, not the numbers
    python benchmarks/bench_step.py --device cuda --dtype bf16

Variants, all on the same base weights and the same batch, timed interleaved in one process:
  floor      the frozen base, no adapter: forward + backward through the activations only (the input
             embeddings require grad), with lorakit's loss path and batch layout. Any LoRA step pays
             at least this.
  floor_hf   the same frozen base with the usual `model(labels=...).loss` (logits at every position).
  lorakit    lorakit's trainer step: token_loss_sum (logits only where labels are) / n, backward, AdamW,
             with the trainer's recompute.rebuilt_activations (the floor keeps what plain autograd keeps)
             and its flat batches (train.flat_batches: examples of unequal length end to end in one
             unpadded row, attention.flat_attention; equal lengths stay (B, T)).
  compiled   the same with lorakit's compile switch (--compile; each decoder layer through torch.compile;
             its partitioner decides what to keep, so no rebuilt activations, as in the trainer).
  ckpt       the same with per-layer gradient checkpointing (--checkpointing; train.gradient_checkpointing).
  peft       PEFT's get_peft_model + model(labels=...).loss, backward, AdamW (PEFT + Trainer's step).
LoRA: r=16, alpha=32, all-linear, dropout 0; the optimizer step is in the timed step for lorakit and PEFT.

Batches: a fully labelled grid (every token carries loss), and a prompt-masked chat batch (the
synthetic chat examples of bench_train.py: 40-600-token prompts, 8-160-token answers, padded to the
longest for PEFT, flat for lorakit; loss on answers only). The chat batch is where label-only logits
and flat batches pay.

Time: median of per-round ratios of process CPU time (CPU) or synchronised wall time (CUDA), the
order reversed each round (see common.interleaved). Memory: for each variant, one step's peak above
the level before it: process RSS on CPU (VmHWM after a reset, with glibc's mmap threshold fixed so
freed tensors leave RSS; measured in a child process so that this setting does not tax the timed
steps' allocations) and live tensor bytes (torch.profiler); CUDA max allocated on GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import subprocess
import sys
import time
import zlib

from common import omp_wait_policy

OMP_WAIT = omp_wait_policy(sys.argv[1:])

import torch  # noqa: E402  (after OMP_WAIT_POLICY is set)
from bench_core import DTYPES, MODEL, build_base, shape_args, shape_parser  # noqa: E402
from bench_train import make_examples  # noqa: E402
from common import (fixed_mmap_threshold, interleaved, machine_info, ms, peak_rss_growth,  # noqa: E402
                    peak_step_memory, ratio, write_report)

EXTRAS = ("compiled", "ckpt")  # optional lorakit variants, reported against the floor and plain lorakit
GRID = [(1, 512), (4, 128), (4, 512), (8, 256)]
QUICK_GRID = [(2, 64), (2, 256)]


def parse_args(argv=None):
    p = shape_parser(__doc__, "4 layers, a small grid, 2 rounds: a smoke test")
    p.add_argument("--grid", default=None, help="cells as BxT,BxT (default 1x512,4x128,4x512,8x256)")
    p.add_argument("--chat-batch", type=int, default=4, help="rows in the prompt-masked chat batch (0: skip)")
    p.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    p.add_argument("--checkpointing", action="store_true", help="add the gradient-checkpointing variant")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per cell (default 5; quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--omp-wait", default="passive", choices=["passive", "active", "default"])
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # see cpu_memory_in_child
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/results/step-<device>.md)")
    a = shape_args(p, argv, "step")
    a.rounds = a.rounds or (2 if a.quick else 5)
    a.min_rounds = a.max_rounds = a.rounds
    a.cells = ([tuple(int(v) for v in c.split("x")) for c in a.grid.split(",")] if a.grid
               else QUICK_GRID if a.quick else GRID)
    return a


# -- models and steps ------------------------------------------------------------------------------------

def build_variants(base, compile_: bool, checkpointing: bool = False) -> dict:
    import lorakit
    import peft
    kw = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")
    def ours():
        torch.manual_seed(1)  # the same initial A on every side
        return lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))

    torch.manual_seed(1)
    models = {"floor": base, "peft": peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw)),
              "lorakit": ours()}
    if compile_:
        models["compiled"] = ours()
        lorakit.compile_layers(models["compiled"])
    if checkpointing:
        models["ckpt"] = ours()
        lorakit.enable_checkpointing(models["ckpt"].get_base_model())
    with torch.no_grad():  # the same non-zero B everywhere, so the adapter really contributes
        named = [{n.removesuffix(".weight"): p for n, p in m.named_parameters() if ".lora_B." in n}
                 for k, m in models.items() if k != "floor"]
        for name, p in named[0].items():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.01)
            for other in named[1:]:
                other[name].copy_(p)
    for m in models.values():
        m.train()
    base.requires_grad_(False)
    base.enable_input_require_grads()  # the floor back-propagates through every activation
    return models


def steps_for(models: dict, batch: dict, losses: dict) -> dict:
    from lorakit.layers import recompute
    from lorakit.models import attention
    from lorakit.eval.losses import token_loss_sum

    def ours(model, opt, lean=True):
        b = batch["flat"]  # as the trainer collates (train.flat_batches)

        def step():  # as the trainer's step (train._accumulate), with its rebuilt activations unless compiled
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            with attention.for_batch(model, b):
                with recompute.rebuilt_activations() if lean and opt is not None else contextlib.nullcontext():
                    loss_sum, n = token_loss_sum(model, b)
                (loss_sum / n).backward()
            if opt is not None:
                opt.step()
            return float(loss_sum) / n
        return step

    def hf(model, opt):
        def step():
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            loss = model(**batch["padded"]).loss
            loss.backward()
            if opt is not None:
                opt.step()
            return float(loss)
        return step

    def adamw(model):
        # fused, as lorakit's trainer and HF Trainer's default ("adamw_torch_fused") both use
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    fns = {"floor": ours(models["floor"], None), "floor_hf": hf(models["floor"], None),
           "lorakit": ours(models["lorakit"], adamw(models["lorakit"])),
           "peft": hf(models["peft"], adamw(models["peft"]))}
    for extra in EXTRAS:
        if extra in models:
            fns[extra] = ours(models[extra], adamw(models[extra]), lean=extra != "compiled")

    def recorded(name, fn):
        return lambda: losses.setdefault(name, []).append(fn())
    return {n: recorded(n, f) for n, f in fns.items()}


def labelled_batch(b: int, t: int, device) -> dict:
    ids = torch.randint(3, MODEL["vocab_size"], (b, t), generator=torch.Generator().manual_seed(3))
    return both_layouts([{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids], device)


def chat_batch(rows: int, device) -> dict:
    return both_layouts(make_examples(rows, 5, MODEL["vocab_size"]), device)


def both_layouts(examples: list[dict], device) -> dict:
    """{"padded": the usual (B, T) batch (PEFT's side), "flat": the trainer's (batching.collate with
    flat=True: one unpadded row when lengths differ, else the same (B, T) batch)}."""
    from lorakit.data import batching
    return {"padded": batching.to_device(batching.collate(examples, pad_id=0), device),
            "flat": batching.to_device(batching.collate(examples, 0, flat=True), device)}


# -- one cell --------------------------------------------------------------------------------------------

def run_cell(label: str, models: dict, batch: dict, args, device, log) -> dict:
    losses: dict = {}
    steps = steps_for(models, batch, losses)
    extras = [e for e in EXTRAS if e in steps]
    order = ["floor", "lorakit", "peft", "floor_hf"] + extras
    times = interleaved({n: steps[n] for n in order}, args, device, budget_s=0.0)
    metric = "cpu" if device.type == "cpu" else "wall"
    mem = memory_of(steps, order, device) if device.type != "cpu" else None  # CPU: in a child process
    n_tokens = int(batch["padded"]["attention_mask"].sum())
    n_labels = int((batch["padded"]["labels"][:, 1:] != -100).sum())
    cell = {"label": label, "shape": tuple(batch["padded"]["input_ids"].shape), "tokens": n_tokens, "labels": n_labels,
            "ms": {n: ms(times["wall"], n) for n in order}, "mem": mem,
            "r": {"lorakit/floor": ratio(times[metric], "lorakit", "floor"),
                  "lorakit/peft": ratio(times[metric], "lorakit", "peft"),
                  "peft/floor_hf": ratio(times[metric], "peft", "floor_hf")},
            "loss_diff": abs(losses["lorakit"][0] - losses["peft"][0])}
    for e in extras:
        cell["r"][f"{e}/floor"] = ratio(times[metric], e, "floor")
        cell["r"][f"{e}/lorakit"] = ratio(times[metric], e, "lorakit")
    log(f"{label}: " + ", ".join(f"{n}={v:.0f}ms" for n, v in cell["ms"].items())
        + " | " + ", ".join(f"{k}={v['median']:.3f}" for k, v in cell["r"].items()))
    return cell


def memory_of(steps: dict, order: list, device) -> dict:
    """Each variant's peak memory over one step (after one unmeasured step: optimizer states exist)."""
    for n in order:
        steps[n]()
    return {n: {"tensor": peak_step_memory(steps[n], device) / 2**20,
                "rss": (peak_rss_growth(steps[n]) or 0) / 2**20 if device.type == "cpu" else None} for n in order}


def cpu_memory_in_child(argv: list[str], log) -> list[dict]:
    """Run this benchmark with --memory-only in a fresh process; its per-cell memory dicts.

    RSS is read with glibc's mmap threshold fixed (see common.fixed_mmap_threshold), which makes every
    large tensor a fresh mmap with page faults: right for following live memory, wrong for timing
    (it taxes whichever variant allocates more). So times come from this process, which keeps
    glibc's defaults as training does, and memory from a child."""
    log("memory: measuring in a child process (fixed mmap threshold)")
    out = subprocess.run([sys.executable, __file__, *argv, "--memory-only"], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# -- report ----------------------------------------------------------------------------------------------

def fmt(r: dict) -> str:
    return f"{r['median']:.3f} [{r['q1']:.3f}–{r['q3']:.3f}]"


def report(cells: list[dict], args, info: list[str], seconds: float, device) -> str:
    cmd = "python benchmarks/bench_step.py " + " ".join(sys.argv[1:])
    extras = [e for e in EXTRAS if f"{e}/floor" in cells[0]["r"]]
    out = [f"# One LoRA training step: lorakit vs PEFT vs the frozen-base floor ({device.type}, {args.dtype})", "",
           f"Command: `{cmd.strip()}`  (whole run {seconds:.0f} s)", "", *info,
           f"- model: SmolLM2-135M-shaped Llama, {args.layers} layers"
           + (" (**reduced: not the reference numbers**)" if args.layers != MODEL["num_hidden_layers"] else "")
           + "; LoRA r=16, alpha=32, all-linear, dropout 0; AdamW in the lorakit and PEFT steps",
           f"- {args.warmup} warmup + {args.rounds} timed rounds per cell, variants interleaved; ratio = median of "
           f"per-round ratios of {'process CPU time' if device.type == 'cpu' else 'wall time'} [IQR]",
           f"- OMP_WAIT_POLICY={OMP_WAIT}", "", "## Time", "",
           "| batch | tokens (labelled) | floor ms | lorakit ms | PEFT ms | lorakit / floor (≤ 1.05) | "
           "lorakit / PEFT | PEFT / its floor (HF loss)" + "".join(f" | {e} / floor | {e} / lorakit" for e in extras)
           + " |", "|---|---|---:|---:|---:|---|---|---" + "|---|---" * len(extras) + "|"]
    for c in cells:
        row = (f"| {c['label']} | {c['tokens']} ({c['labels']}) | {c['ms']['floor']:.0f} | {c['ms']['lorakit']:.0f} | "
               f"{c['ms']['peft']:.0f} | {fmt(c['r']['lorakit/floor'])} | {fmt(c['r']['lorakit/peft'])} | "
               f"{fmt(c['r']['peft/floor_hf'])}")
        row += "".join(f" | {fmt(c['r'][f'{e}/floor'])} | {fmt(c['r'][f'{e}/lorakit'])}" for e in extras)
        out.append(row + " |")
    kinds = ["rss", "tensor"] if device.type == "cpu" else ["tensor"]
    unit = {"rss": "RSS", "tensor": "tensor bytes" if device.type == "cpu" else "CUDA max allocated"}
    out += ["", "## Peak memory of one step (MiB above the level before it)", "",
            "| batch | " + " | ".join(f"floor {unit[k]} | lorakit {unit[k]} | PEFT {unit[k]} | lorakit / PEFT"
                                      for k in kinds) + " |", "|---" + "|---:|---:|---:|---" * len(kinds) + "|"]
    for c in cells:
        m = c["mem"]
        out.append(f"| {c['label']} | " + " | ".join(
            f"{m['floor'][k]:.0f} | {m['lorakit'][k]:.0f} | {m['peft'][k]:.0f} | "
            f"**{m['lorakit'][k] / max(m['peft'][k], 1e-9):.2f}**" for k in kinds) + " |")
    for e, what in (("compiled", "compiled (train.compile)"), ("ckpt", "with gradient checkpointing (ckpt)")):
        if e in extras:
            out += ["", f"Peak {what}: " + ", ".join(
                f"{c['label']}: {c['mem'][e][kinds[0]]:.0f} MiB {unit[kinds[0]]} "
                f"({c['mem'][e][kinds[0]] / max(c['mem']['peft'][kinds[0]], 1e-9):.2f}× PEFT)" for c in cells)]
    out += ["", "First-step loss, lorakit vs PEFT (same weights, same batch; must agree): "
            + ", ".join(f"{c['label']} {c['loss_diff']:.1e}" for c in cells)]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
        if args.memory_only:
            fixed_mmap_threshold()
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:6.1f}s]", *a, file=sys.stderr, flush=True)  # noqa: E731
    info = machine_info(args, device)
    models = build_variants(build_base(args.layers, device, dtype), args.compile, args.checkpointing)
    batches = [(f"{b}×{t} labelled", labelled_batch(b, t, device)) for b, t in args.cells]
    if args.chat_batch:
        batches.append((f"{args.chat_batch}-row chat", chat_batch(args.chat_batch, device)))
    if args.memory_only:  # the child of cpu_memory_in_child: one JSON line on stdout
        order = [n for n in ["floor", "lorakit", "peft", "floor_hf", *EXTRAS] if n in models or n == "floor_hf"]
        print(json.dumps([memory_of(steps_for(models, batch, {}), order, device) for _, batch in batches]))
        return 0
    cells = [run_cell(label, models, batch, args, device, log) for label, batch in batches]
    if device.type == "cpu":
        for cell, mem in zip(cells, cpu_memory_in_child(sys.argv[1:], log), strict=True):
            cell["mem"] = mem
    write_report(args.out, report(cells, args, info, time.perf_counter() - t0, device), log)
    return 0 if all(c["loss_diff"] < (1e-4 if dtype == torch.float32 else 5e-2) for c in cells) else 1


if __name__ == "__main__":
    sys.exit(main())
