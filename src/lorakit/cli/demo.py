"""lorakit demo [CONFIG]: the main job, train the demo adapter on the default model and show before / after."""

from __future__ import annotations


def add(sub) -> None:
    d = sub.add_parser("demo", help="the main job: train the demo adapter on the default model, show before/after")
    d.add_argument("config", nargs="?", default="configs/demo.yaml")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def run(args) -> int:
    from ..demo import run_demo
    run_demo(args.config, args.overrides)
    return 0
