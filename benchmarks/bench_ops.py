"""What LoRA's own products cost next to the frozen base's, per linear layer (CPU or CUDA).

    python benchmarks/bench_ops.py [--tokens 512] [--rank 16] [--device cpu]

For the SmolLM2-135M projection shapes, times the base work a frozen linear must do in a training
step (forward x·Wᵀ and the input gradient g·W) and the six skinny products the LoRA adapter adds in
lorakit's fused node (layers._LoraLinear): x·Aᵀ, y += s·(x·Aᵀ)·Bᵀ, g·B, grad_x += s·gB·A, gBᵀ·x,
gᵀ·(x·Aᵀ). Medians of 30 calls; the adapter's share is why an eager LoRA step sits above the floor.

It then profiles one floor step of the SmolLM2-135M-shaped model (bench_step's floor: the frozen
base's forward + backward through the activations, 4×128 tokens) to find the share of its time spent
in the linears' GEMMs, and prints the lower bound that follows for any LoRA step:
    step / floor >= 1 + (linear share of the floor) × (adapter FLOPs / base linear FLOPs),
reached only if the adapter's products ran at the base GEMMs' rate, which skinny r-wide GEMMs do not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import omp_wait_policy, sync

omp_wait_policy(sys.argv[1:])
import torch  # noqa: E402

SHAPES = {"q/o_proj": (576, 576), "k/v_proj": (576, 192), "gate/up_proj": (576, 1536), "down_proj": (1536, 576)}


def median_ms(fn, device, reps: int = 30) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--omp-wait", default="passive")
    p.add_argument("--no-bound", action="store_true", help="skip the floor step's profile and the bound")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    print("| layer (in→out) | base fwd + grad_x ms | adapter's 6 products ms | adapter / base | FLOPs adapter / base |")
    print("|---|---:|---:|---|---|")
    totals = {"base": 0.0, "adapter": 0.0, "base_flops": 0, "adapter_flops": 0}
    for name, (i, o) in SHAPES.items():
        base, adapter = layer_ms(i, o, a.tokens, a.rank, device)
        flops = {"base_flops": 2 * i * o, "adapter_flops": 3 * a.rank * (i + o)}  # MACs per token
        print(f"| {name} ({i}→{o}) | {base:.2f} | {adapter:.2f} | {adapter / base:.3f} | "
              f"{flops['adapter_flops'] / flops['base_flops']:.3f} |")
        copies = 1 if name == "down_proj" else 2  # each other row stands for two projections of a layer
        for k, v in {"base": base, "adapter": adapter, **flops}.items():
            totals[k] += v * copies
    flop_ratio = totals["adapter_flops"] / totals["base_flops"]
    print(f"\nPer decoder layer (q, k, v, o, gate, up, down): base {totals['base']:.1f} ms, adapter "
          f"{totals['adapter']:.1f} ms = {100 * totals['adapter'] / totals['base']:.1f}% of the base's linear time "
          f"for {100 * flop_ratio:.1f}% of its FLOPs.")
    if not a.no_bound and device.type == "cpu":  # CUDA's profile splits ops from kernels: not done here
        share = floor_linear_share(device)
        print(f"Floor step (4×128 tokens): the linears' GEMMs take {100 * share:.1f}% of its time, so any LoRA "
              f"step is at least {1 + share * flop_ratio:.3f}× the floor (the adapter at the base GEMMs' rate); "
              f"at the measured rates {1 + share * totals['adapter'] / totals['base']:.3f}×.")
    return 0


def layer_ms(i: int, o: int, n: int, r: int, device) -> tuple[float, float]:
    """(base fwd + grad_x ms, the adapter's six products ms) for one (in=i, out=o) linear at n tokens."""
    x, W, g = (torch.randn(*s, device=device) for s in ((n, i), (o, i), (n, o)))
    A, B = torch.randn(r, i, device=device), torch.randn(o, r, device=device)
    xa, y, gB, gx = x @ A.T, x @ W.T, g @ B, g @ W
    base = median_ms(lambda: x @ W.T, device) + median_ms(lambda: g @ W, device)
    adapter = sum(median_ms(f, device) for f in (
        lambda: x @ A.T, lambda: y.addmm_(xa, B.T), lambda: g @ B, lambda: gx.addmm_(gB, A),
        lambda: gB.T @ x, lambda: g.T @ xa))
    return base, adapter


def floor_linear_share(device) -> float:
    """Share of one floor step's self CPU time (torch.profiler) spent in GEMMs (aten::mm/addmm/bmm)."""
    from torch.profiler import ProfilerActivity, profile

    from bench_core import build_base
    from bench_step import labelled_batch
    from lorakit.eval.losses import token_loss_sum
    model = build_base(30, device, torch.float32)
    model.requires_grad_(False)
    model.enable_input_require_grads()  # as bench_step's floor: backward through every activation
    batch = labelled_batch(4, 128, device)["flat"]

    def step():
        loss_sum, n = token_loss_sum(model, batch)
        (loss_sum / n).backward()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm")) / total


if __name__ == "__main__":
    sys.exit(main())
