"""The page on its own, or on `lorakit serve`'s app: what `lorakit ui` runs.

    standalone(page) -> FastAPI      runs and adapters only (no model: the playground says it needs one)
    run_ui(runs, adapters, model, host, port, api_key)
                                     without a model: the standalone page under uvicorn; with one:
                                     `lorakit serve` (the OpenAI API, the engine) with the page at /
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LorakitError
from .api import Page, error, mount


def _need_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise LorakitError(f"lorakit ui needs {e.name}: pip install 'lorakit[serve]'") from None


def page_for(runs=None, adapters=None, model: str | None = None, api_key: str | None = None,
             admin_key: str | None = None) -> Page:
    """A Page over the folders, each checked to be a folder."""
    for flag, folder in (("--runs", runs), ("--adapters", adapters)):
        if folder is not None and not Path(folder).is_dir():
            raise LorakitError(f"{flag} {str(folder)!r} is not a folder; give an existing folder (or leave {flag} out)")
    return Page(Path(runs).resolve() if runs is not None else None,
                Path(adapters).resolve() if adapters is not None else None, model, api_key, admin_key)


def standalone(page: Page):
    """A FastAPI app serving only the page, with the server's error shape for unknown paths and bad queries."""
    _need_extra()
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    app = FastAPI(title="lorakit ui", version="1")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(400, f"{param or 'request'}: {first.get('msg')}", "BadRequestError", param)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        kind = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(exc.status_code, "BadRequestError")
        return error(exc.status_code, str(exc.detail), kind)

    return mount(app, page)


def run_ui(runs=None, adapters=None, model: str | None = None, host: str = "127.0.0.1", port: int = 7860,
           api_key: str | None = None, **serve_options) -> None:
    """Serve the page until interrupted (with `model`: through `lorakit serve`, the playground on)."""
    _need_extra()
    page = page_for(runs, adapters, model, api_key, serve_options.get("admin_key"))
    if model is not None:
        from ..serve.server import serve
        serve(model=model, adapters=adapters, host=host, port=port, api_key=api_key,
              extend=lambda app: mount(app, page), **serve_options)
        return
    import uvicorn
    print(f"lorakit ui: http://{host}:{port}/  (runs: {page.runs}, adapters: {page.adapters}; no model, "
          "so no playground: add --model M)", flush=True)
    uvicorn.run(standalone(page), host=host, port=port, log_level="warning")
