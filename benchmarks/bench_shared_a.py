"""Would one A matmul for projections that share an input (q/k/v; gate/up) pay? An upper bound.

    python benchmarks/bench_shared_a.py [--tokens 512 2048] [--device cuda]

The only work that sharing removes is on the A side: for k projections reading the same x (N, in),
separate adapters run k products x·Aᵢᵀ (N, r), k gradient products gBᵢᵀ·x (r, in) and k input-gradient
products gBᵢ·Aᵢ accumulated into grad_x (N, in); shared, each is one product with r·k columns. The B
side is per projection either way. This times exactly those products both ways on the SmolLM2-135M
shapes (q/k/v: 576 -> 576/192/192, gate/up: 576 -> 1536/1536; r=16), interleaved, median of 30, and
scales the saving to a 30-layer model's step so it can be set against the step time of
bench_step.py. Nothing here is in the library: it decides whether the feature is worth building.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import omp_wait_policy

omp_wait_policy(sys.argv[1:])

import torch  # noqa: E402

GROUPS = {"q/k/v": (576, 3), "gate/up": (576, 2)}  # in_features, projections sharing the input
R, LAYERS = 16, 30


def a_side(x, As, gBs, grad_x, shared: bool):
    """The A-side products of forward + backward for len(As) projections reading x."""
    if shared:
        A = torch.cat(As)  # (k·r, in): built every step, since the A's change every step
        _ = x @ A.T  # (N, k·r)
        gB = torch.cat(gBs, dim=1)  # (N, k·r): what the per-projection B products hand back
        _ = gB.T @ x  # (k·r, in)
        grad_x.addmm_(gB, A)
    else:
        for A, gB in zip(As, gBs):
            _ = x @ A.T
            _ = gB.T @ x
            grad_x.addmm_(gB, A)


def time_group(n: int, d_in: int, k: int, device, reps: int = 30) -> tuple[float, float]:
    x = torch.randn(n, d_in, device=device)
    As = [torch.randn(R, d_in, device=device) for _ in range(k)]
    gBs = [torch.randn(n, R, device=device) for _ in range(k)]
    grad_x = torch.zeros(n, d_in, device=device)
    times = {False: [], True: []}
    for i in range(reps + 3):
        for shared in ((False, True) if i % 2 else (True, False)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a_side(x, As, gBs, grad_x, shared)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times[shared].append(time.perf_counter() - t0)
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--omp-wait", default="passive")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"A-side products, separate vs shared, {device}; ms per decoder layer (median of 30)\n")
    print("| tokens | group | separate ms | shared ms | saved ms | saved per 30-layer step ms |")
    print("|---|---|---:|---:|---:|---:|")
    for n in args.tokens:
        total = 0.0
        for name, (d_in, k) in GROUPS.items():
            sep, sh = time_group(n, d_in, k, device)
            total += (sep - sh) * LAYERS
            print(f"| {n} | {name} | {sep * 1e3:.3f} | {sh * 1e3:.3f} | {(sep - sh) * 1e3:.3f} | "
                  f"{(sep - sh) * LAYERS * 1e3:.1f} |")
        print(f"| {n} | **both** | | | | **{total * 1e3:.1f}** |")


if __name__ == "__main__":
    main()
