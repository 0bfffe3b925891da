"""Putting a server together: load the base, scan the adapters, start the engine, run uvicorn.

    build(model, tokenizer, name, adapters=DIR, ...) -> (app, engine)   for an already loaded model
    serve(model="M", adapters="DIR", host=..., port=...)                 what `lorakit serve` runs

Ctrl-C / SIGTERM drains: new requests get 503 (in the API's error shape) while the running and
waiting ones finish, then uvicorn shuts down and the process exits 0. A second signal, or
`drain_s` seconds, stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time

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
          rescan_s: float | None = 2.0, max_wait_s: float = 2.0, max_running: int = 64, lora_path: str = "ranks",
          lora_kernel: str = "auto"):
    """(FastAPI app, engine) serving `model` under `name` and each adapter folder of `adapters`.

    max_loaded: resident adapters, a count (8) or bytes of adapter tensors ("256MB"); host_cache_bytes:
    the host-memory LRU of read adapters; rescan_s: how often the folder is rescanned (None: never;
    folders are also looked up when asked for); max_wait_s: the scheduler's bound on preferring
    resident adapters over a waiting request; lora_path: how decoding tokens of many adapters run
    ("ranks": gathered per rank from slot pools, "padded": one pool at the largest rank, "segments":
    per-adapter GEMMs; see docs/benchmarks.md); lora_kernel: "auto" reads the pools in place with the
    compiled BGMV kernel on CPU when it builds (layers/bgmv.py), "off" uses the torch gather."""
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
                    lora_path=lora_path, kernel=lora_kernel)
    settings = Settings(name, api_key, admin_key, max_queue, engine.max_model_len)
    app = create_app(engine, settings, metrics)
    if start:
        engine.start()
    return app, engine


def serve(model: str, adapters=None, host: str = "127.0.0.1", port: int = 8000, threads: int | None = None,
          extend=None, **options) -> None:
    """Load `model` (what every lorakit command takes) and serve it with the adapters until interrupted.
    extend: called with the app before it serves, to add routes from a floor above (the web page, lorakit.ui)."""
    _need_extra()
    import uvicorn
    from ..models.load import load_model
    if threads is not None:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    loaded, tokenizer = load_model(model)
    app, engine = build(loaded, tokenizer, model, adapters, **options)
    if extend is not None:
        extend(app)
    log = logging.getLogger("lorakit.serve")
    log.info("serving %r and adapters %s on http://%s:%d/v1", model, engine.registry.names(), host, port)
    log.info("mixed-adapter decoding: %s", "the BGMV kernel" if engine.kernel is not None else
             "per-adapter GEMMs" if engine.pools is None else "the torch gather")
    for folder, why in engine.registry.skipped.items():
        log.warning("not serving %s: %s", folder, why)
    server = _draining_server(uvicorn, app, engine, host, port)
    server.run()
    log.info("stopped")


def _draining_server(uvicorn, app, engine, host: str, port: int, drain_s: float = 60.0):
    """A uvicorn.Server whose Ctrl-C / SIGTERM first drains (see the module doc)."""
    log = logging.getLogger("lorakit.serve")

    class Draining(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {sig: signal.signal(sig, self.drain) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:  # unlike uvicorn's, the signal is not raised again: a drained server exits 0
                for sig, handler in old.items():
                    signal.signal(sig, handler)

        def drain(self, sig, frame) -> None:
            if app.state.draining:  # the second signal: stop now
                log.warning("second signal: stopping without waiting")
                self.should_exit = self.force_exit = True
                return
            app.state.draining = True
            running, waiting = engine.depth()
            log.info("draining: %d running and %d waiting requests finish, new ones get 503", running, waiting)
            threading.Thread(target=self._wait, daemon=True, name="lorakit-drain").start()

        def _wait(self) -> None:
            deadline = time.monotonic() + drain_s
            while any(engine.depth()) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.should_exit = True  # uvicorn then lets the open responses finish sending

    return Draining(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30))
