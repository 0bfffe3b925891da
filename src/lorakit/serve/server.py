"""Putting a server together: load the base, scan the adapters, start the engine, run uvicorn.

    build(model, tokenizer, name, adapters=DIR, ...) -> (app, engine)   for an already loaded model
    serve(model="M", adapters="DIR", host=..., port=...)                 what `lorakit serve` runs

uvicorn handles Ctrl-C / SIGTERM: it stops accepting, lets the open requests finish, then the app's
shutdown drains the engine.
"""

from __future__ import annotations

import logging

import torch

from ..errors import LorakitError
from ..layers import BASE


def _need_extra():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LorakitError(f"lorakit serve needs {e.name}: pip install 'lorakit[serve]'") from None


def build(model, tokenizer, name: str, adapters=None, max_loaded: int | str = 8, api_key: str | None = None,
          admin_key: str | None = None, max_batch_tokens: int = 256, max_queue: int = 256,
          max_model_len: int | None = None, start: bool = True, host_cache_bytes: int | str = "1GiB",
          rescan_s: float | None = 2.0, max_wait_s: float = 2.0, max_running: int = 64, lora_path: str = "ranks"):
    """(FastAPI app, engine) serving `model` under `name` and each adapter folder of `adapters`.

    max_loaded: resident adapters, a count (8) or bytes of adapter tensors ("256MB"); host_cache_bytes:
    the host-memory LRU of read adapters; rescan_s: how often the folder is rescanned (None: never;
    folders are also looked up when asked for); max_wait_s: the scheduler's bound on preferring
    resident adapters over a waiting request; lora_path: how decoding tokens of many adapters run
    ("ranks": gathered per rank from slot pools, "padded": one pool at the largest rank, "segments":
    per-adapter GEMMs; see docs/benchmarks.md)."""
    _need_extra()
    from .app import Settings, create_app
    from .engine import Engine
    from .metrics import Metrics
    from .registry import Registry, parse_bytes, parse_resident
    model.eval()
    count, size = parse_resident(max_loaded)
    registry = Registry(model, adapters, name, count, size, parse_bytes(host_cache_bytes), rescan_s)
    metrics = Metrics(lambda adapter: name if adapter == BASE else adapter)
    engine = Engine(model, tokenizer, registry, max_batch_tokens=max_batch_tokens, max_model_len=max_model_len,
                    metrics=metrics, max_wait_s=max_wait_s, max_running=max_running,
                    lora_path=lora_path)
    settings = Settings(name, api_key, admin_key, max_queue, engine.max_model_len)
    app = create_app(engine, settings, metrics)
    if start:
        engine.start()
    return app, engine


def serve(model: str, adapters=None, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          **options) -> None:
    """Load `model` (what every lorakit command takes) and serve it with the adapters until interrupted."""
    _need_extra()
    import uvicorn
    from ..models.load import load_model
    if threads is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    loaded, tokenizer = load_model(model)
    app, engine = build(loaded, tokenizer, model, adapters, **options)
    log = logging.getLogger("lorakit.serve")
    log.info("serving %r and adapters %s on http://%s:%d/v1", model, engine.registry.names(), host, port)
    for folder, why in engine.registry.skipped.items():
        log.warning("not serving %s: %s", folder, why)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
