"""Many adapters on one base: mixed-adapter batches in lorakit vs PEFT's adapter_names, one process.

    PYTHONPATH=src python benchmarks/bench_multi.py                  # full size, CPU fp32, ~6-8 min
    PYTHONPATH=src python benchmarks/bench_multi.py --quick          # 4 layers, 3 rounds (smoke test)
    PYTHONPATH=src python benchmarks/bench_multi.py --device cuda --dtype bf16

Model: a SmolLM2-135M-shaped Llama (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv heads,
vocab 49152, tied embeddings), random init. Adapters: r=16, alpha=32, random non-zero A and B, on
q/k/v/o (first table) and on all linear layers (second table); lorakit and PEFT hold the same weights.

Forward (no_grad, eval): batch 8×64 tokens, row i uses adapter i mod N for N = 1, 2, 4, 8. For N = 16
and 64 the batch is N rows × 512/N tokens (the same 512 tokens), every row its own adapter, and the
base is timed on that shape. Variants: the base model; lorakit's stacked path (default); lorakit's
segment fallback (a loop over adapters, as layers/mixed.py's docstring explains); PEFT's adapter_names.
Generation: greedy, 32 new tokens, 8 left-padded prompts of ≤ 64 tokens, 8 distinct adapters.

Method (the machine is shared and noisy): all variants in this one process, interleaved with a rotating
order after warmup; ms = median over rounds; ratios = median of per-round ratios [interquartile range].
Correctness is checked on the way: lorakit's logits and tokens against PEFT's.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import statistics
import sys
import time

import torch

from bench_core import DTYPES, MODEL, build_base, shape_args, shape_parser
from common import machine_info, write_report

TARGETS = {"q/k/v/o": ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": "all-linear"}


def parse_args(argv=None):
    p = shape_parser(__doc__, "4 layers, 3 rounds: a smoke test, not the numbers")
    p.add_argument("--counts", default="1,2,4,8,16,64", help="numbers of adapters, first target set")
    p.add_argument("--counts-2", default="8", help="numbers of adapters for the other target sets")
    p.add_argument("--targets", default="q/k/v/o,all-linear", help=f"comma list of {list(TARGETS)}")
    p.add_argument("--gen-targets", default="q/k/v/o", help="target sets that also time generation")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per forward variant")
    p.add_argument("--gen-rounds", type=int, default=None, help="timed rounds per generation variant")
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--segments-at", default="8", help="adapter counts that also time the segment fallback")
    p.add_argument("--out", default=None, help="markdown file (default benchmarks/results/multi-<device>.md)")
    a = shape_args(p, argv, "multi")
    a.rounds = a.rounds or (3 if a.quick else 5)
    a.gen_rounds = a.gen_rounds or (2 if a.quick else 3)
    a.counts, a.counts_2 = [int(c) for c in a.counts.split(",")], [int(c) for c in a.counts_2.split(",")]
    a.segments_at = {int(c) for c in a.segments_at.split(",") if c}
    a.targets, a.gen_targets = a.targets.split(","), a.gen_targets.split(",")
    return a


# -- models ------------------------------------------------------------------------------------------------

def with_adapters(base, targets, n: int):
    """(lorakit model, PEFT model): deep copies of `base` with n adapters a0..a{n-1}, equal weights."""
    import peft

    import lorakit

    lk = copy.deepcopy(base)
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
        lorakit.add_adapter(lk, cfg, f"a{i}")
    pcfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg, adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, n):
        pm.add_adapter(f"a{i}", pcfg)
    with torch.no_grad():
        for name, layer in lorakit.lora_layers(lk):
            target = pm.base_model.model.get_submodule(name)
            for a in layer.lora_A:
                if layer.kind == "embedding":
                    target.lora_embedding_A[a].copy_(layer.lora_A[a]), target.lora_embedding_B[a].copy_(layer.lora_B[a])
                else:
                    target.lora_A[a].weight.copy_(layer.lora_A[a]), target.lora_B[a].weight.copy_(layer.lora_B[a])
    return lk.eval(), pm.eval()


# -- timing ------------------------------------------------------------------------------------------------

def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(variants: dict, rounds: int, device, warmup: int = 1) -> dict[str, list[float]]:
    """Every variant once per round, the order rotated each round; seconds per call, warmup dropped.

    On a shared (virtual) machine a call sometimes stalls for seconds; the per-round ratio medians
    absorb a stall or two, and best_ratio (fastest over fastest) is immune to stalls altogether.
    """
    names = list(variants)
    times = {n: [] for n in names}
    for r in range(warmup + rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            sync(device)
            t0 = time.perf_counter()
            variants[n]()
            sync(device)
            if r >= warmup:
                times[n].append(time.perf_counter() - t0)
    return times


def ratio(times: dict, num: str, den: str) -> tuple[float, float, float]:
    xs = sorted(a / b for a, b in zip(times[num], times[den]))
    if len(xs) < 4:
        return statistics.median(xs), xs[0], xs[-1]
    q1, med, q3 = statistics.quantiles(xs, n=4)
    return med, q1, q3


def ms(times: dict, name: str) -> float:
    return 1000 * statistics.median(times[name])


def fmt(r: tuple) -> str:
    return f"{r[0]:.3f} [{r[1]:.2f}–{r[2]:.2f}]"


@contextlib.contextmanager
def segments_only():
    """Force layers/mixed.py's segment fallback (for the comparison column)."""
    from lorakit.layers import mixed

    saved = mixed.can_stack
    mixed.can_stack = lambda layer, present: False
    try:
        yield
    finally:
        mixed.can_stack = saved


# -- the benchmarks ----------------------------------------------------------------------------------------

def forward_variants(base, lk, pm, ids, names, keep: dict, segments: bool) -> dict:
    from lorakit import adapter_rows

    def run_base():
        with torch.no_grad():
            keep["base"] = base(input_ids=ids).logits

    def run_lk():
        with torch.no_grad(), adapter_rows(lk, names):
            keep["lorakit"] = lk(input_ids=ids).logits

    def run_seg():
        with torch.no_grad(), adapter_rows(lk, names), segments_only():
            keep["segments"] = lk(input_ids=ids).logits

    def run_peft():
        with torch.no_grad():
            keep["peft"] = pm(input_ids=ids, adapter_names=names).logits

    variants = {"base": run_base, "lorakit": run_lk, "peft": run_peft}
    if segments:
        variants["segments"] = run_seg
    return variants


def bench_forward(args, base, lk, pm, n: int, device, log, warmup: bool) -> dict:
    rows, seq = (8, 64) if n <= 8 else (n, max(1, 512 // n))
    ids = torch.randint(0, MODEL["vocab_size"], (rows, seq), generator=torch.Generator().manual_seed(3)).to(device)
    names = [f"a{i % n}" for i in range(rows)]
    keep: dict = {}
    variants = forward_variants(base, lk, pm, ids, names, keep, n in args.segments_at)
    times = interleaved(variants, args.rounds, device, warmup=1 if warmup else 0)
    diff = (keep["lorakit"].float() - keep["peft"].float()).abs().max().item()
    log(f"  N={n} ({rows}×{seq}): " + ", ".join(f"{k}={ms(times, k):.0f}ms" for k in times)
        + f", max abs Δ vs PEFT {diff:.1e}")
    return {"n": n, "shape": f"{rows}×{seq}", "times": times, "diff": diff}


def bench_generate(args, base, lk, pm, device, log) -> dict:
    from lorakit import adapter_rows

    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(1, MODEL["vocab_size"], (8, 64), generator=gen)
    mask = torch.ones_like(ids)
    for i, pad in enumerate([0, 3, 7, 12, 0, 20, 5, 30]):  # left padding
        ids[i, :pad], mask[i, :pad] = 0, 0
    ids, mask = ids.to(device), mask.to(device)
    names = [f"a{i}" for i in range(8)]
    kw = dict(attention_mask=mask, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
              do_sample=False, pad_token_id=0)
    keep: dict = {}

    def run(label, model, rows=None, peft_names=None):
        def go():
            with torch.no_grad(), (adapter_rows(model, rows) if rows else contextlib.nullcontext()):
                extra = {"adapter_names": peft_names} if peft_names else {}
                keep[label] = model.generate(input_ids=ids, **kw, **extra)
        return go

    variants = {"base": run("base", base), "lorakit": run("lorakit", lk, rows=names),
                "peft": run("peft", pm, peft_names=names)}
    times = interleaved(variants, args.gen_rounds, device, warmup=0)  # the forwards warmed up
    same = torch.equal(keep["lorakit"], keep["peft"])
    log("  generate: " + ", ".join(f"{k}={ms(times, k):.0f}ms" for k in times) + f", tokens equal PEFT: {same}")
    return {"times": times, "same": same}


# -- report ------------------------------------------------------------------------------------------------

def forward_table(label: str, results: list[dict]) -> list[str]:
    out = [f"### Forward, mixed batch, r=16 on {label}", "",
           "| adapters | batch | base ms | lorakit ms | lorakit / base | segments / base | PEFT ms | PEFT / base "
           "| PEFT / lorakit | best over best base: lorakit, PEFT | max abs Δ |",
           "|---:|---|---:|---:|---|---|---:|---|---|---|---:|"]
    for r in results:
        t = r["times"]
        seg = fmt(ratio(t, "segments", "base")) if "segments" in t else "–"
        out.append(f"| {r['n']} | {r['shape']} | {ms(t, 'base'):.0f} | {ms(t, 'lorakit'):.0f} | "
                   f"{fmt(ratio(t, 'lorakit', 'base'))} | {seg} | {ms(t, 'peft'):.0f} "
                   f"| {fmt(ratio(t, 'peft', 'base'))} | {fmt(ratio(t, 'peft', 'lorakit'))} | {best_ratios(t)} "
                   f"| {r['diff']:.1e} |")
    return out + [""]


def best_ratios(t: dict) -> str:
    """lorakit and PEFT over the base, each variant's fastest round: what stalls cannot inflate."""
    best = {k: min(v) for k, v in t.items()}
    return f"{best['lorakit'] / best['base']:.3f}, {best['peft'] / best['base']:.3f}"


def generate_table(label: str, g: dict, tokens: int) -> list[str]:
    t = g["times"]
    return [f"### Greedy generation, {tokens} new tokens, 8 prompts (left-padded), 8 adapters on {label}", "",
            "| base ms | lorakit ms | lorakit / base | PEFT ms | PEFT / base | PEFT / lorakit "
            "| best over best base: lorakit, PEFT | tokens = PEFT |",
            "|---:|---:|---|---:|---|---|---|---|",
            f"| {ms(t, 'base'):.0f} | {ms(t, 'lorakit'):.0f} | {fmt(ratio(t, 'lorakit', 'base'))} "
            f"| {ms(t, 'peft'):.0f} | {fmt(ratio(t, 'peft', 'base'))} | {fmt(ratio(t, 'peft', 'lorakit'))} "
            f"| {best_ratios(t)} | {g['same']} |", ""]


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t0:6.1f}s]", *a, file=sys.stderr, flush=True)  # noqa: E731
    info = machine_info(args, device)
    base = build_base(args.layers, device, dtype)
    log(f"base: {args.layers} layers, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params")
    sections, ok = [], True
    for k, label in enumerate(args.targets):
        counts = args.counts if k == 0 else args.counts_2
        lk, pm = with_adapters(base, TARGETS[label], max(counts + [8]))
        log(f"{label}: {max(counts + [8])} adapters on lorakit and PEFT copies")
        shapes, results = set(), []
        for n in counts:  # warm up on the first count and on every new batch shape
            shape = (8, 64) if n <= 8 else (n, 512 // n)
            results.append(bench_forward(args, base, lk, pm, n, device, log, warmup=shape not in shapes))
            shapes.add(shape)
        ok &= all(r["diff"] <= (1e-3 if dtype == torch.float32 else 0.5) for r in results)
        sections += forward_table(label, results)
        if label in args.gen_targets:
            g = bench_generate(args, base, lk, pm, device, log)
            ok &= g["same"]
            sections += generate_table(label, g, args.gen_tokens)
        del lk, pm
        gc.collect()
    cmd = "PYTHONPATH=src python benchmarks/bench_multi.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = "\n".join([f"# Mixed-adapter batches: lorakit vs PEFT adapter_names ({device.type}, {args.dtype})", "",
                      f"Command: `{cmd.strip()}`  (total {time.perf_counter() - t0:.0f} s)", "", *info,
                      f"- model: SmolLM2-135M-shaped Llama, {args.layers} layers"
                      + (" (**reduced: not the reference numbers**)" if args.layers != MODEL["num_hidden_layers"]
                         else "") + ", random init; adapters r=16, alpha=32, random A and B",
                      f"- rounds: {args.rounds} per forward variant (after one warmup round per batch shape), "
                      f"{args.gen_rounds} per generation variant; variants interleaved in a rotating order; "
                      "ms = median; ratio = median of per-round ratios [interquartile range]; 'best over best' = "
                      "fastest round over the base's fastest round (immune to the host's occasional stalls)",
                      "- N ≤ 8: batch 8×64, row i uses adapter i mod N; N > 8: N rows × 512/N tokens, one adapter "
                      "per row, base timed on the same shape. 'segments' = lorakit's loop-over-adapters fallback.",
                      "- max abs Δ = largest logit difference lorakit vs PEFT (same weights)", "", *sections])
    write_report(args.out, text, log)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
