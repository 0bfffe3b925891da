"""The outer HTTP guard of `lorakit serve`, as a plain ASGI middleware: bounded bodies, draining, no
tracebacks to clients, one log line per request that does not log itself.

Plain ASGI rather than Starlette's BaseHTTPMiddleware (`@app.middleware("http")`): that one runs the
app in a task of its own and carries every message of a streamed response through anyio memory
streams, which with one SSE chunk per token was about half of the server's HTTP time at 32 clients
(docs/benchmarks.md, serving). Here a message costs one function call.
"""

from __future__ import annotations

import logging
import time

from fastapi.responses import JSONResponse

log = logging.getLogger("lorakit.serve")


def error(status: int, message: str, type_: str, param: str | None = None, headers=None) -> JSONResponse:
    """OpenAI's error shape, with the HTTP status as code."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}},
                        status_code=status, headers=headers)


class Guard:
    """ASGI middleware over `app`: 413 past max_body_bytes (by Content-Length), 503 while draining()
    is true, 500 in the API's shape for a bug of ours, and the access log line (unless the endpoint set
    request.state.logs_itself: a generation logs when it ends)."""

    def __init__(self, app, max_body_bytes: int, draining):
        self.app, self.max_body_bytes, self.draining = app, max_body_bytes, draining

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        size = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if size is not None and (not size.isdigit() or int(size) > self.max_body_bytes):
            await error(413, f"request body over {self.max_body_bytes} bytes", "BadRequestError")(scope, receive, send)
            return
        status = [500, False]  # the status sent, whether the response started
        logged = [False]

        def access_log() -> None:
            logged[0] = True
            state = scope.get("state") or {}
            if not state.get("logs_itself"):
                model = state.get("model")
                log.info("request %s %s%s status=%d latency=%.3fs", scope["method"], scope["path"],
                         f" model={model}" if model else "", status[0], time.perf_counter() - t0)

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0], status[1] = message["status"], True
            elif message["type"] == "http.response.body" and not message.get("more_body") and not logged[0]:
                access_log()  # before the last bytes go: once the client has its answer, the line exists
            await send(message)

        if self.draining():
            await error(503, "the server is shutting down; retry on another instance or after it restarts",
                        "ServiceUnavailableError", headers={"Retry-After": "5"})(scope, receive, sending)
        else:
            try:
                await self.app(scope, receive, sending)
            except Exception:  # a bug of ours; never a traceback to the client
                log.exception("request failed")
                if not status[1]:  # nothing sent yet
                    await error(500, "internal error", "InternalServerError")(scope, receive, sending)
        if not logged[0]:  # the client left before the end
            access_log()
