"""What LoRA's own products cost next to the frozen base's, per linear layer (CPU or CUDA).

    python benchmarks/bench_ops.py [--tokens 512] [--rank 16] [--device cpu]

For the SmolLM2-135M projection shapes, times the base work a frozen linear must do in a training
step (forward x·Wᵀ and the input gradient g·W) and the six skinny products the LoRA adapter adds in
lorakit's fused node (layers._LoraLinear): x·Aᵀ, y += s·(x·Aᵀ)·Bᵀ, g·B, grad_x += s·gB·A, gBᵀ·x,
gᵀ·(x·Aᵀ). Medians of 30 calls; the adapter's share is why an eager LoRA step sits above the floor.
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
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    print("| layer (in→out) | base fwd + grad_x ms | adapter's 6 products ms | adapter / base | FLOPs adapter / base |")
    print("|---|---:|---:|---|---|")
    for name, (i, o) in SHAPES.items():
        n, r = a.tokens, a.rank
        x, W, g = (torch.randn(*s, device=device) for s in ((n, i), (o, i), (n, o)))
        A, B = torch.randn(r, i, device=device), torch.randn(o, r, device=device)
        xa, y, gB, gx = x @ A.T, x @ W.T, g @ B, g @ W
        base = median_ms(lambda: x @ W.T, device) + median_ms(lambda: g @ W, device)
        adapter = sum(median_ms(f, device) for f in (
            lambda: x @ A.T, lambda: y.addmm_(xa, B.T), lambda: g @ B, lambda: gx.addmm_(gB, A),
            lambda: gB.T @ x, lambda: g.T @ xa))
        print(f"| {name} ({i}→{o}) | {base:.2f} | {adapter:.2f} | {adapter / base:.3f} | "
              f"{6 * r * (i + o) / (4 * i * o):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
