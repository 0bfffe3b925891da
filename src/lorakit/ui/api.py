"""The page's HTTP face: GET / (the page), /ui/static/* (its files), and JSON under /ui/api/.

    GET /ui/api/info                     what the page was started with (model or none, folders, key)
    GET /ui/api/runs                     run summaries, newest first
    GET /ui/api/run?id=RUN               one run: resolved config (nested and flat), final figures
    GET /ui/api/metrics?id=RUN&offset=B  metrics.jsonl rows from byte B (a live run: poll with the
                                         returned offset; a changed "file" means start over at 0)
    GET /ui/api/adapters                 adapters of --adapters DIR and of the runs
    GET /ui/api/adapter?id=SOURCE:PATH   the inspection report
    GET /ui/api/similarity?a=ID&b=ID     subspace similarity φ(i, j) of two adapters

The page and its static files carry no data and need no key; with an API key every /ui/api/ endpoint
wants `Authorization: Bearer KEY` (the page asks for it once, keeps it for the tab). Errors are the
server's shape, {"error": {"message", "type", "param", "code"}}: 400 for a path that leaves its folder,
404 for one that is not there or a folder the page was not given, never a 500 for what a client sends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..errors import LorakitError
from . import adapters as adapter_views
from . import runs as run_views
from .folders import Missing, Refused

STATIC = Path(__file__).parent / "static"


@dataclass
class Page:
    """What the page shows: the folders (None: not given), the served model's name (None: no playground)."""
    runs: Path | None = None
    adapters: Path | None = None
    model: str | None = None
    api_key: str | None = None
    admin_key: str | None = None

    def roots(self) -> dict:
        return {"runs": self.runs, "adapters": self.adapters}


def error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status)


def answer(call, param: str | None = None):
    """Run a view; a LorakitError becomes the 4xx it means (Refused 400, Missing 404, other 400)."""
    try:
        return call()
    except Refused as e:
        return error(400, str(e), "BadRequestError", param)
    except Missing as e:
        return error(404, str(e), "NotFoundError", param)
    except LorakitError as e:
        return error(400, str(e), "BadRequestError", param)
    except FileNotFoundError as e:  # removed between listing and reading
        return error(404, f"{e.filename or 'a file'} is gone (deleted or moved while the page was open)",
                     "NotFoundError", param)


def router(page: Page) -> APIRouter:
    def auth(request: Request) -> None:
        if page.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if given[7:] not in (page.api_key, page.admin_key) or not given.lower().startswith("bearer "):
            raise _Unauthorized()

    summaries = run_views.Summaries()  # this page's; each entry is checked against its file's stat
    r = APIRouter()
    api = APIRouter(prefix="/ui/api", dependencies=[Depends(auth)])

    @r.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @api.get("/info")
    def info():
        why = None if page.model else ("the playground needs a model: start with `lorakit ui --model M` "
                                       "(or use `lorakit serve`)")
        return {"model": page.model, "runs": page.runs is not None, "adapters": page.adapters is not None,
                "auth": page.api_key is not None, "playground": why}

    def need_runs() -> Path:
        if page.runs is None:
            raise Missing("the page was started without --runs DIR: there are no runs to show")
        return page.runs

    @api.get("/runs")
    def runs():
        return answer(lambda: {"runs": run_views.find_runs(need_runs(), summaries)})

    @api.get("/run")
    def run(id: str = Query(..., description="run folder relative to --runs")):
        return answer(lambda: run_views.read_run(need_runs(), id), "id")

    @api.get("/metrics")
    def metrics(id: str = Query(...), offset: int = Query(0, ge=0)):
        return answer(lambda: {"id": id, **run_views.read_metrics_from(need_runs(), id, offset)}, "id")

    @api.get("/adapters")
    def adapters():
        return answer(lambda: {"adapters": adapter_views.list_adapters(page.roots())})

    @api.get("/adapter")
    def adapter(id: str = Query(...)):
        return answer(lambda: adapter_views.report(page.roots(), id), "id")

    @api.get("/similarity")
    def similarity(a: str = Query(...), b: str = Query(...)):
        return answer(lambda: adapter_views.similarity(page.roots(), a, b), "a")

    r.include_router(api)
    return r


class _Unauthorized(Exception):
    pass


def mount(app: FastAPI, page: Page) -> FastAPI:
    """Add the page to `app` (lorakit serve's, or a bare one): routes, static files, the 401 handler."""
    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request, exc):
        return error(401, "missing or wrong API key: send `Authorization: Bearer KEY`", "AuthenticationError")

    app.include_router(router(page))
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    return app
