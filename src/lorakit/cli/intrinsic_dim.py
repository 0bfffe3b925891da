"""lorakit intrinsic-dim CONFIG --dims 10,100,1000 [--over adapter|model] [--said] [--reference adapter|full]
[--json]: the metric for training only d numbers (θ0 + P·θd), and d90 (analysis/intrinsic.py)."""

from __future__ import annotations

import argparse
import json

from .common import positive_int


def _dims(text: str) -> list[int]:
    try:
        dims = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 10,100,1000") from None
    if not dims or dims[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every d must be >= 1")
    return dims


def add(sub) -> None:
    p = sub.add_parser("intrinsic-dim", help="train only d numbers (a random subspace) for several d; d90")
    p.add_argument("config", help="YAML run config (its data, model, steps; its adapter for --over adapter)")
    p.add_argument("--run", help="name of the run when the file defines several")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as in lorakit train")
    p.add_argument("--dims", type=_dims, default=_dims("10,30,100,300,1000,3000"), help="comma-separated d values")
    p.add_argument("--over", choices=["adapter", "model"], default="adapter",
                   help="project onto the adapter's tensors (at their init) or all of the model's")
    p.add_argument("--said", action="store_true", help="structure-aware: a trained scale λ per tensor (from d)")
    p.add_argument("--reference", choices=["adapter", "full"], default="adapter",
                   help="the 100%% run: the config's adapter training, or full fine-tuning")
    p.add_argument("--metric", choices=["exact_match", "eval_loss"],
                   help="default: exact_match when the eval records have answers, else eval_loss")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of θd (default 0.05)")
    p.add_argument("--reference-lr", type=float, help="learning rate of the reference (default: the config's; "
                   "5e-5 for --reference full)")
    p.add_argument("--eval-limit", type=positive_int, help="evaluate on the first N eval records only")
    p.add_argument("--out", help="folder for intrinsic.json / .png and the runs (default OUTPUT_DIR/intrinsic-OVER)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..analysis.intrinsic import measure
    from ..train import load_run
    cfg = load_run(args.config, args.run, args.overrides)
    result = measure(cfg, args.dims, over=args.over, said=args.said, reference=args.reference, metric=args.metric,
                     lr=args.lr, reference_lr=args.reference_lr, eval_limit=args.eval_limit, out=args.out,
                     progress=not args.quiet)
    if not args.json:
        print(f"{result['metric']}: base {result['base']:.4g}, reference {result['reference']:.4g}")
        for p in result["points"]:
            print(f"  d={p['d']:>7d}  {p['value']:.4g}")
        print(f"d90: {result['d90']}")
    print(json.dumps(result) if args.json else "")
    return 0
