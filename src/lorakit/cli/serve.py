"""lorakit serve --model M --adapters DIR: an OpenAI-compatible server for a base model and its adapters."""

from __future__ import annotations

from ..models.default import DEFAULT_MODEL
from .common import positive_int


def add(sub) -> None:
    p = sub.add_parser("serve", help="serve the base model and every adapter in a folder over an OpenAI-compatible "
                       "HTTP API (continuous batching)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local folder, Hub id, or the embedded default '{DEFAULT_MODEL}'; served under this name")
    p.add_argument("--adapters", help="folder whose subfolders are adapters (served under the subfolder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-loaded", type=positive_int, default=8, help="adapters attached at once (LRU)")
    p.add_argument("--api-key", help="every endpoint then wants `Authorization: Bearer KEY`")
    p.add_argument("--admin-key", help="key for /v1/load_lora_adapter and /v1/unload_lora_adapter (off without)")
    p.add_argument("--max-batch-tokens", type=positive_int, default=256, help="tokens per engine step")
    p.add_argument("--max-queue", type=positive_int, default=256, help="waiting requests before 429")
    p.add_argument("--max-model-len", type=positive_int, help="prompt + completion tokens (default: the model's)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--runs", help="training runs the web page at / shows (as `lorakit ui --runs`)")
    p.add_argument("--no-page", action="store_true", help="no web page at / (the API only)")


def run(args) -> int:
    from ..serve.server import serve
    extend = None
    if not args.no_page:
        from ..ui.app import page_for
        from ..ui.api import mount
        page = page_for(args.runs, args.adapters, args.model, args.api_key, args.admin_key)
        extend = lambda app: mount(app, page)  # noqa: E731
    serve(model=args.model, adapters=args.adapters, host=args.host, port=args.port, max_loaded=args.max_loaded,
          extend=extend, api_key=args.api_key, admin_key=args.admin_key, max_batch_tokens=args.max_batch_tokens,
          max_queue=args.max_queue, max_model_len=args.max_model_len, threads=args.threads)
    return 0
