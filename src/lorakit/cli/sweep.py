"""lorakit sweep CONFIG --set lora.r=1,2,4 [--set KEY=V1,V2 ...] [--metric eval_loss|exact_match] [--json]:
a grid of training runs (the product of the --set lists), resumable; a table and a plot (analysis/sweep.py)."""

from __future__ import annotations

import json

from .common import positive_int


def add(sub) -> None:
    p = sub.add_parser("sweep", help="train a grid of runs (product of --set lists); table and plot")
    p.add_argument("config", help="YAML run config")
    p.add_argument("--run", help="name of the run when the file defines several")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a grid axis, e.g. --set lora.r=1,2,4 or --set lora.target_modules=[q_proj,v_proj],"
                        "all-linear (one value: a constant override)")
    p.add_argument("--metric", choices=["eval_loss", "exact_match"], default="eval_loss",
                   help="what the table and plot compare (eval_loss always comes with the run)")
    p.add_argument("--eval-limit", type=positive_int, help="exact_match on the first N eval records only")
    p.add_argument("--out", help="the sweep's folder (default OUTPUT_DIR/sweep); each point is a run below it")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    from ..analysis.sweep import format_table, run_sweep
    summary = run_sweep(args.config, args.sets, run=args.run, metric=args.metric, eval_limit=args.eval_limit,
                        out=args.out, progress=not args.quiet)
    print(json.dumps(summary) if args.json else format_table(summary))
    return 1 if summary["failed"] else 0
