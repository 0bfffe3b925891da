"""Core benchmarks of lorakit against Hugging Face PEFT (the reference), on one SmolLM2-135M-shaped Llama.

    PYTHONPATH=src python benchmarks/bench_core.py                 # full size, CPU fp32, ~6 min
    PYTHONPATH=src python benchmarks/bench_core.py --quick         # 4 layers, fewer repeats (smoke test)
    PYTHONPATH=src python benchmarks/bench_core.py --device cuda --dtype bf16

What is measured (targets from the issue):
  1. LoRA training step (r=16, alpha=32, all-linear, dropout 0; 4x128 tokens with labels):
     zero_grad -> forward -> loss.backward -> AdamW.step. The optimizer step is included on purpose:
     it changes A and B every step, as real training does, so no implementation can reuse a DoRA norm
     across steps. lorakit <= PEFT.
  2. DoRA step / LoRA step, lorakit <= 1.15 (PEFT's own ratio reported next to it).
  3. Unmerged inference (eval, no_grad forward) over the plain base model: lorakit <= 1.05.
  4. merge_and_unload inference over the base (~1.00) and DoRA inference / LoRA inference (eval mode).
  5. Peak memory of one training step: the peak of live tensor bytes allocated during the step above
     the level before it (activations saved for backward, gradients, temporaries; optimizer state
     already exists). CPU: torch.profiler(profile_memory=True) '[memory]' events ('Total Allocated'),
     which count tensors only and so are immune to malloc caching and to other processes. CUDA:
     torch.cuda.max_memory_allocated() minus memory_allocated() before the step.

Method, for a shared and noisy machine: every variant lives in this one process, the variants run
interleaved (A B C D, then D C B A, ...) after warmup, and for each pair the ratio is the median of
the per-round ratios (two runs next to each other see the same load), reported with its interquartile
range. On CPU the ratios use process CPU time (all threads), which leaves out the time spent waiting
for a core; wall-time ratios are printed next to them, and absolute times are median wall times.
OMP_WAIT_POLICY defaults to PASSIVE: with several jobs on 2 cores, spinning OpenMP threads starve
each other and made every forward ~4x slower and erratic. Timed rounds stop at --budget seconds once
--min-rounds are done. lorakit and PEFT get the same base weights and the same adapter weights (B set
non-zero so DoRA's norm is not trivially ||W0||); their losses and logits are compared as a check.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time


from common import omp_wait_policy  # noqa: E402  (sets OMP_WAIT_POLICY; common imports torch lazily)

OMP_WAIT = omp_wait_policy(sys.argv[1:])

import torch  # noqa: E402  (after OMP_WAIT_POLICY is set)
from common import SMOLLM2_135M, interleaved, machine_info, ms, peak_step_memory, ratio, write_report  # noqa: E402

MODEL = SMOLLM2_135M
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- setup -------------------------------------------------------------------------------------------------

def shape_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """A parser with the flags every benchmark on the SmolLM2 shape shares (doc: the script's docstring)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 30, the real shape)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    return p


def shape_args(p: argparse.ArgumentParser, argv, name: str) -> argparse.Namespace:
    """Parse; default --layers (4 when --quick, else the real 30) and --out (results/<name>-<device>.md)."""
    a = p.parse_args(argv)
    a.layers = a.layers or (4 if a.quick else MODEL["num_hidden_layers"])
    if a.out is None:
        a.out = f"benchmarks/results/{name}-{torch.device(a.device).type}{'-quick' if a.quick else ''}.md"
    return a


def parse_args(argv=None):
    p = shape_parser(__doc__, "4 layers, 3 rounds: a smoke test, not the numbers")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--omp-wait", default="passive", choices=["passive", "active", "default"],
                   help="OMP_WAIT_POLICY. PASSIVE (default): idle OpenMP threads sleep instead of spinning, "
                        "which on a shared CPU is several times faster and far steadier for every variant")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the timed rounds (default 300; quick 60); rounds stop at the budget "
                        "once the minimum is reached")
    p.add_argument("--metric", default="auto", choices=["auto", "cpu", "wall"],
                   help="what the ratios (and pass/fail) use: process CPU time or wall time; auto = cpu on "
                        "CPU, wall on CUDA")
    p.add_argument("--min-rounds", type=int, default=3, help="timed rounds per variant, at least")
    p.add_argument("--max-rounds", type=int, default=None, help="timed rounds per variant, at most")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory benchmark")
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/results/core-<device>.md)")
    a = shape_args(p, argv, "core")
    a.budget = a.budget if a.budget is not None else (60.0 if a.quick else 300.0)
    a.max_rounds = a.max_rounds or (5 if a.quick else 15)
    return a


def build_base(layers: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**MODEL, "num_hidden_layers": layers})
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    model.eval()
    return model


def lora_config(lib: str, dora: bool):
    cls = __import__("lorakit" if lib == "lorakit" else "peft").LoraConfig
    return cls(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, use_dora=dora,
               task_type="CAUSAL_LM")


def wrap(lib: str, base, dora: bool):
    """A deep copy of `base` with a fresh adapter from `lib` (same seed, so same initial A)."""
    get_peft_model = __import__("lorakit" if lib == "lorakit" else "peft").get_peft_model
    torch.manual_seed(1)
    return get_peft_model(copy.deepcopy(base), lora_config(lib, dora))


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    """Adapter parameters by a library-neutral name: PEFT's '...lora_A.default.weight' and lorakit's
    '...lora_A.default' both become '...lora_A.default'."""
    return {n.removesuffix(".weight"): p for n, p in model.named_parameters() if ".lora_" in n}


@torch.no_grad()
def randomize_and_copy(peft_model, lk_model, seed: int = 2) -> None:
    """Give B non-zero values in the PEFT model, then copy every adapter tensor into lorakit's."""
    gen = torch.Generator().manual_seed(seed)
    src, dst = adapter_tensors(peft_model), adapter_tensors(lk_model)
    if sorted(src) != sorted(dst):
        missing = sorted(set(src) ^ set(dst))[:5]
        raise SystemExit(f"adapter names differ between PEFT and lorakit, e.g. {missing}")
    for name in sorted(src):
        if ".lora_B." in name:
            noise = torch.randn(src[name].shape, generator=gen) * 0.01
            src[name].copy_(noise.to(src[name].device, src[name].dtype))
        dst[name].copy_(src[name])


def make_batch(args, device):
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, MODEL["vocab_size"], (args.batch, args.seq), generator=gen).to(device)
    return ids


# -- the benchmarks --------------------------------------------------------------------------------------

def train_steps(models: dict, ids: torch.Tensor) -> tuple[dict, dict]:
    """name -> a zero-argument training step (zero_grad, forward with labels, backward, AdamW), and the
    losses each step saw."""
    losses: dict[str, list[float]] = {n: [] for n in models}

    def step_fn(name):
        model = models[name]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
        return step

    for m in models.values():
        m.train()
    return {n: step_fn(n) for n in models}, losses


def logits_fn(model, ids, keep: dict, name: str):
    def fwd():
        with torch.no_grad():
            keep[name] = model(input_ids=ids).logits
    return fwd


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# -- report ----------------------------------------------------------------------------------------------

def verdict(value: float, op: str, target: float) -> str:
    ok = value <= target if op == "<=" else abs(value - 1.0) <= target
    return "PASS" if ok else "FAIL"


def fmt_r(r: dict) -> str:
    return f"{r['median']:.3f} [{r['q1']:.3f}–{r['q3']:.3f}]"


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    metric = args.metric if args.metric != "auto" else ("cpu" if device.type == "cpu" else "wall")
    t_start = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t_start:6.1f}s]", *a, file=sys.stderr, flush=True)  # noqa: E731
    info = machine_info(args, device)

    base = build_base(args.layers, device, dtype)
    ids = make_batch(args, device)
    log(f"base model: {args.layers} layers, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params")
    models = {}
    for tag in ("lora", "dora"):
        models[f"peft_{tag}"] = wrap("peft", base, tag == "dora")
        models[f"lk_{tag}"] = wrap("lorakit", base, tag == "dora")
        randomize_and_copy(models[f"peft_{tag}"], models[f"lk_{tag}"])
    checks: dict[str, float] = {}

    # 1 + 2. training steps, the four variants interleaved ---------------------------------------------
    steps, losses = train_steps(models, ids)
    train = interleaved({n: steps[n] for n in ("lk_dora", "lk_lora", "peft_lora", "peft_dora")},
                        args, device, 0.4 * args.budget)
    checks["LoRA loss, first step"] = abs(losses["lk_lora"][0] - losses["peft_lora"][0])
    checks["DoRA loss, first step"] = abs(losses["lk_dora"][0] - losses["peft_dora"][0])
    log("train step ms: " + ", ".join(f"{n}={ms(train['wall'], n):.0f}" for n in train["wall"]))

    # 5. peak memory of one training step (after warmup, so the optimizer state already exists) --------
    mem = {}
    if not args.no_memory:
        for n in ("lk_lora", "peft_lora", "lk_dora", "peft_dora"):
            mem[n] = peak_step_memory(steps[n], device) / 2**20
        log("peak MiB: " + ", ".join(f"{n}={v:.0f}" for n, v in mem.items()))
    del steps
    for m in models.values():
        m.zero_grad(set_to_none=True)

    # 3 + 4. inference: identical adapter weights again (training moved them), eval mode, no_grad -------
    for tag in ("lora", "dora"):
        randomize_and_copy(models[f"peft_{tag}"], models[f"lk_{tag}"], seed=4)
    peft_merged = copy.deepcopy(models["peft_lora"]).merge_and_unload()  # for the correctness check only
    # the order puts each compared pair side by side where it can (see interleaved)
    infer_models = {"lk_merged": copy.deepcopy(models["lk_lora"]).merge_and_unload(), "base": base,
                    **{n: models[n] for n in ("lk_lora", "lk_dora", "peft_lora", "peft_dora")}}
    for m in [*infer_models.values(), peft_merged]:
        m.eval()
    logits: dict[str, torch.Tensor] = {}
    infer = interleaved({n: logits_fn(m, ids, logits, n) for n, m in infer_models.items()},
                        args, device, 0.6 * args.budget)
    log("inference ms: " + ", ".join(f"{n}={ms(infer['wall'], n):.0f}" for n in infer["wall"]))
    logits_fn(peft_merged, ids, logits, "peft_merged")()
    checks["LoRA logits (eval)"] = max_diff(logits["lk_lora"], logits["peft_lora"])
    checks["DoRA logits (eval)"] = max_diff(logits["lk_dora"], logits["peft_dora"])
    checks["merged logits, lorakit vs PEFT"] = max_diff(logits["lk_merged"], logits["peft_merged"])
    checks["merged vs unmerged logits, lorakit"] = max_diff(logits["lk_merged"], logits["lk_lora"])

    # -- report ---------------------------------------------------------------------------------------
    def row(name, kind, lk, pf, pairs, target, op, bound, unit="ms"):
        """pairs: (label, numerator, denominator) of the same timing table; the first decides the result."""
        t = train if kind == "train" else infer
        rs = [(label, ratio(t[metric], a_, b_), ratio(t["wall"], a_, b_)) for label, a_, b_ in pairs]
        main_r = "; ".join(f"{label}{fmt_r(r)}" for label, r, _ in rs)
        wall_r = "; ".join(f"{label}{fmt_r(w)}" for label, _, w in rs)
        return (name, f"{ms(t['wall'], lk):.0f} {unit}", f"{ms(t['wall'], pf):.0f} {unit}", main_r, wall_r,
                target, verdict(rs[0][1]["median"], op, bound))

    base_ms = ms(infer["wall"], "base")
    rows = [
        row("1. LoRA train step", "train", "lk_lora", "peft_lora", [("lorakit/PEFT ", "lk_lora", "peft_lora")],
            "≤ 1.00", "<=", 1.0),
        row("2. DoRA train step, DoRA/LoRA", "train", "lk_dora", "peft_dora",
            [("lorakit ", "lk_dora", "lk_lora"), ("PEFT ", "peft_dora", "peft_lora")], "lorakit ≤ 1.15", "<=", 1.15),
        row("2b. DoRA train step, lorakit/PEFT", "train", "lk_dora", "peft_dora",
            [("", "lk_dora", "peft_dora")], "≤ 1.00 (ours)", "<=", 1.0),
        row(f"3. unmerged inference / base ({base_ms:.0f} ms)", "infer", "lk_lora", "peft_lora",
            [("lorakit ", "lk_lora", "base"), ("PEFT ", "peft_lora", "base")], "lorakit ≤ 1.05", "<=", 1.05),
        row("4a. merged (merge_and_unload) / base", "infer", "lk_merged", "base",
            [("lorakit ", "lk_merged", "base")], "≈ 1.00 (±0.03)", "~", 0.03),
        row("4b. DoRA / LoRA inference (eval)", "infer", "lk_dora", "peft_dora",
            [("lorakit ", "lk_dora", "lk_lora"), ("PEFT ", "peft_dora", "peft_lora")], "lorakit ≤ 1.05 (ours)",
            "<=", 1.05),
    ]
    rows[4] = (rows[4][0], rows[4][1], "(base) " + rows[4][2], *rows[4][3:])
    for tag in ("lora", "dora") if mem else ():
        lk, pf = mem[f"lk_{tag}"], mem[f"peft_{tag}"]
        label = {"lora": "5. peak memory, LoRA train step", "dora": "5b. peak memory, DoRA train step"}[tag]
        rows.append((label, f"{lk:.0f} MiB", f"{pf:.0f} MiB", f"lorakit/PEFT {lk / pf:.3f}",
                     "(deterministic)", "≤ 1.00", verdict(lk / pf, "<=", 1.0)))

    tol = 1e-5 if dtype == torch.float32 else 5e-2
    cmd = "PYTHONPATH=src python benchmarks/bench_core.py " + " ".join(argv if argv is not None else sys.argv[1:])
    metric_words = ("process CPU time (time.process_time, both threads)" if metric == "cpu"
                    else "wall time" + (" (CUDA-synchronised)" if device.type == "cuda" else ""))
    out = [f"# lorakit core benchmarks vs PEFT ({device.type}, {args.dtype})", "",
           f"Command: `{cmd.strip()}`  (whole run {time.perf_counter() - t_start:.0f} s)", "", *info,
           f"- model: SmolLM2-135M-shaped Llama, {args.layers} layers"
           + (" (**reduced: not the reference numbers**)" if args.layers != MODEL["num_hidden_layers"] else "")
           + f", random init; batch {args.batch}×{args.seq} tokens; LoRA r=16, alpha=32, all-linear, dropout 0",
           f"- rounds: {args.warmup} warmup + {len(train['wall']['lk_lora'])} timed (train), "
           f"{len(infer['wall']['base'])} timed (inference); the variants of a section run interleaved, "
           "reversing the order every other round",
           f"- lorakit / PEFT columns: median wall time. ratio: median of the per-round ratios of {metric_words} "
           "[interquartile range]; pass/fail is decided on it." + (
               " On a shared CPU, wall time also counts the time spent waiting for a core, so wall ratios "
               "(next column) scatter much more; with an idle machine the two agree." if metric == "cpu" else ""),
           f"- OMP_WAIT_POLICY={OMP_WAIT}", "",
           f"| benchmark | lorakit | PEFT | ratio ({metric}) | ratio (wall) | target | result |",
           "|---|---:|---:|---|---|---|---|"]
    out += [f"| {' | '.join(r)} |" for r in rows]
    out += ["", "Training step = zero_grad, forward with labels, backward, AdamW step. The optimizer step is "
            "included so A and B change every step, as in real training: no implementation can reuse the "
            "DoRA weight norm across steps.", "",
            "Memory = peak bytes of live tensors allocated during one training step above the level before it: "
            "activations kept for backward, gradients and temporaries; weights and optimizer state are not "
            "included. " + ("torch.cuda.max_memory_allocated." if device.type == "cuda"
                            else "Measured with torch.profiler(profile_memory=True) '[memory]' events (tensor bytes, "
                                 "not RSS: immune to malloc caching and other processes)."),
            "", f"Correctness, lorakit vs PEFT with identical weights (max |Δ|; tolerance {tol:g} for logits, "
            f"{1e-4 if dtype == torch.float32 else 1e-2:g} for losses):", ""]
    ok = True
    for k, v in checks.items():
        good = v <= (tol if "logits" in k else (1e-4 if dtype == torch.float32 else 1e-2))
        ok &= good
        out.append(f"- {k}: {v:.2e} {'ok' if good else 'MISMATCH'}")
    text = "\n".join(out) + "\n"
    write_report(args.out, text, log)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
