"""lorakit train CONFIG [--run NAME] [--set k=v ...] [--resume | --overwrite]: train an adapter from a YAML run config.

Under torchrun (`torchrun --nproc_per_node N -m lorakit train CONFIG`) every process runs this; rank 0
prints the result. A rank's error goes into torchrun's error file (torch.distributed.elastic's
`record`), so the launcher's failure summary names the rank and shows the cause.
"""

from __future__ import annotations

import json
import os


def add(sub) -> None:
    t = sub.add_parser("train", help="train an adapter from a YAML run config")
    t.add_argument("config", help="YAML file: one run, or several under 'runs:'")
    t.add_argument("--run", help="name of the run to use when the file defines several")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable; wins over the file)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--overwrite", action="store_true",
                   help="output_dir holds another run: move it aside (output_dir.previous-<time>) and start anew")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    from ..train import load_run, train
    cfg = load_run(args.config, args.run, args.overrides)
    go = lambda: train(cfg, resume=args.resume, progress=not args.quiet, overwrite=args.overwrite)  # noqa: E731
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from torch.distributed.elastic.multiprocessing.errors import record
        go = record(go)
    result = go()
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps, "stopped": result.stopped,
                      "train_loss": round(result.train_loss, 4),
                      "eval_loss": None if result.eval_loss is None else round(result.eval_loss, 4)}))
    return 0
