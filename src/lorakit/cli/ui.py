"""lorakit ui [--runs DIR] [--adapters DIR] [--model M] [--port 7860]: the web page (runs, curves, adapters,
and with a model the chat playground through the OpenAI API of `lorakit serve`)."""

from __future__ import annotations

from .common import positive_int


def add(sub) -> None:
    p = sub.add_parser("ui", help="a web page: training runs and their curves (live), adapter reports, and with "
                       "--model a chat playground")
    p.add_argument("--runs", default=None, help="folder holding run folders (what `lorakit train` writes; "
                   "default: ./runs if it exists)")
    p.add_argument("--adapters", help="folder whose subfolders are adapters (inspected; served with --model)")
    p.add_argument("--model", help="serve this base model (and the adapters) for the playground; without it the "
                   "page shows runs and adapters only")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--api-key", help="the page's data and the API then want this key (the page asks for it)")
    p.add_argument("--max-model-len", type=positive_int, help="with --model: prompt + completion tokens")
    p.add_argument("--threads", type=positive_int, help="with --model: torch CPU threads")


def run(args) -> int:
    from pathlib import Path
    from ..ui.app import run_ui
    runs = args.runs if args.runs is not None else ("runs" if Path("runs").is_dir() else None)
    options = {}
    if args.model is not None:
        options = {"max_model_len": args.max_model_len, "threads": args.threads}
    run_ui(runs=runs, adapters=args.adapters, model=args.model, host=args.host, port=args.port,
           api_key=args.api_key, **options)
    return 0
