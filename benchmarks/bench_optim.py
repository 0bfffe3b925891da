"""Optimizer-state memory and step time of each train.optimizer on the demo config (issue 20).

    python benchmarks/bench_optim.py                 # from the repo root: configs/demo.yaml, 4 steps per optimizer, ~2 min on CPU
    python benchmarks/bench_optim.py --steps 6 --config configs/demo.yaml

For each optimizer: the demo run built as `lorakit train` builds it (recipe.build), a few optimizer
steps through the trainer's loop, then the bytes of tensors in the optimizer's state (moments,
bitsandbytes' quantization maps and block maxima, step counters), beside the trainable parameters'
bytes; and the median step time over the steps after the first (which allocates the state).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from common import omp_wait_policy

OMP_WAIT = omp_wait_policy(sys.argv[1:])

import torch  # noqa: E402  (after OMP_WAIT_POLICY is set)

from lorakit.train import load_run, loop, recipe  # noqa: E402
from lorakit.train.optim import OPTIMIZERS, state_bytes  # noqa: E402
from lorakit.train.state import TrainState  # noqa: E402


def measure(config: str, kind: str, steps: int) -> dict:
    cfg = load_run(config, overrides=[f"train.optimizer={kind}", f"train.max_steps={steps}"])
    r = recipe.build(cfg)
    state, times = TrainState(), []
    micro = loop.micro_batches(r.train_data, cfg.train.batch_size, cfg.train.seed, state,
                               cfg.train.group_by_length, torch.float32, r.flat)

    class Timer(loop.Hook):
        def after_step(self, state, step):
            times.append(step.seconds)

    loop.run(r.model, r.optimizer, r.scheduler, micro, steps=steps, state=state, device=r.device,
             max_grad_norm=cfg.train.max_grad_norm, hooks=[Timer()])
    params = sum(p.nbytes for p in r.model.parameters() if p.requires_grad)
    return {"optimizer": kind, "state_mb": state_bytes(r.optimizer) / 2**20, "params_mb": params / 2**20,
            "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--omp-wait", default="passive")
    args = ap.parse_args()
    print(f"# train.optimizer on {args.config}: {args.steps} steps each, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY {OMP_WAIT}\n")
    rows = []
    for kind in OPTIMIZERS:
        started = time.time()
        rows.append(measure(args.config, kind, args.steps))
        print(f"  {kind}: {time.time() - started:.0f} s", file=sys.stderr, flush=True)
    base = rows[0]["state_mb"]
    print("| optimizer | state MiB | state / adamw | state / trainable params | median step s |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['optimizer']} | {row['state_mb']:.2f} | {row['state_mb'] / base:.3f} | "
              f"{row['state_mb'] / row['params_mb']:.3f} | {row['step_s']:.2f} |")


if __name__ == "__main__":
    main()
