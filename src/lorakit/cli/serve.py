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
    p.add_argument("--max-loaded", default="8", help="adapters attached for compute at once (LRU): a count (64) "
                   "or bytes of adapter tensors (256MB)")
    p.add_argument("--host-cache-bytes", default="1GiB", help="host-memory LRU of adapters read from disk, in bytes "
                   "(e.g. 512MB, 2GiB); disk is the tier below")
    p.add_argument("--rescan", type=float, default=2.0, metavar="SECONDS",
                   help="rescan --adapters every SECONDS for new, changed and removed folders (0: only on use)")
    p.add_argument("--lora-path", choices=["ranks", "padded", "segments"], default="ranks",
                   help="decoding tokens of many adapters: gathered per rank from slot pools (ranks), from one pool "
                   "padded to the largest rank (padded), or one GEMM pair per adapter (segments)")
    p.add_argument("--lora-kernel", choices=["auto", "off"], default="auto",
                   help="on CPU, read the pools in place with the compiled BGMV kernel (auto: when a C++ compiler "
                   "and ninja can build it; off: the torch gather)")
    p.add_argument("--max-running", type=positive_int, default=64, help="sequences in the running batch at most")
    p.add_argument("--max-wait", type=float, default=2.0, metavar="SECONDS",
                   help="the scheduler prefers resident adapters, but never past a request waiting this long")
    p.add_argument("--api-key", help="every endpoint then wants `Authorization: Bearer KEY`")
    p.add_argument("--admin-key", help="key for /v1/load_lora_adapter and /v1/unload_lora_adapter (off without)")
    p.add_argument("--max-batch-tokens", type=positive_int, default=256, help="tokens per engine step")
    p.add_argument("--max-queue", type=positive_int, default=256, help="waiting requests before 429")
    p.add_argument("--max-model-len", type=positive_int, help="prompt + completion tokens (default: the model's)")
    p.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--runs", help="training runs the web page at / shows (as `lorakit ui --runs`)")
    p.add_argument("--no-page", action="store_true", help="no web page at / (the API only)")


def run(args) -> int:
    from ..serve.registry import parse_bytes, parse_resident
    from ..serve.server import serve
    parse_resident(args.max_loaded), parse_bytes(args.host_cache_bytes)  # a bad size fails before the model loads
    extend = None
    if not args.no_page:
        from ..ui.app import page_for
        from ..ui.api import mount
        page = page_for(args.runs, args.adapters, args.model, args.api_key, args.admin_key)
        extend = lambda app: mount(app, page)  # noqa: E731
    serve(model=args.model, adapters=args.adapters, host=args.host, port=args.port, max_loaded=args.max_loaded,
          extend=extend, api_key=args.api_key, admin_key=args.admin_key, max_batch_tokens=args.max_batch_tokens,
          max_queue=args.max_queue, max_model_len=args.max_model_len, threads=args.threads,
          host_cache_bytes=args.host_cache_bytes, rescan_s=args.rescan or None, max_wait_s=args.max_wait,
          lora_path=args.lora_path, lora_kernel=args.lora_kernel, max_running=args.max_running)
    return 0
