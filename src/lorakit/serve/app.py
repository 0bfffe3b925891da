"""The HTTP layer of `lorakit serve` (FastAPI): schema -> registry -> engine, nothing else.

Endpoints (OpenAI's and vLLM's names and shapes): GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (SSE when stream, ending with `data: [DONE]`), POST /v1/load_lora_adapter,
POST /v1/unload_lora_adapter (admin key), GET /health, GET /metrics (Prometheus text).
Errors are {"error": {"message", "type", "param", "code"}} with the HTTP status as code; anything a
client can send gets a 4xx, never a 500. While the server drains (app.state.draining, set by
server.py on Ctrl-C / SIGTERM) new requests get 503 in that shape; the running ones finish.
One log line per request (logger lorakit.serve): a generation logs its model, prompt and completion
tokens, latency, time to first token, finish reason and status when it ends; others log when answered.
With an API key every endpoint wants
`Authorization: Bearer KEY` (401 otherwise); the admin endpoints want the admin key.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import LorakitError
from ..eval.generation import render
from ..layers import BASE
from . import registry as reg
from .guard import Guard, error
from .engine import Batched, Engine, Request as EngineRequest
from .sampling import SamplingParams
from .schema import ChatRequest, CompletionRequest, LoadAdapter, Sampling, UnloadAdapter

log = logging.getLogger("lorakit.serve")
STATUS = {"error": 400, "cancelled": 499}  # a generation's logged status by finish reason (499: client left)
STREAM_DOC = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}


@dataclass
class Settings:
    model_name: str
    api_key: str | None = None
    admin_key: str | None = None
    max_queue: int = 256
    max_model_len: int = 2048
    max_body_bytes: int = 4 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.headers = status, message, type_, param, headers


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "BadRequestError", param)


def create_app(engine: Engine, settings: Settings, metrics=None) -> FastAPI:
    """The FastAPI app over a started (or to-be-started) engine."""
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        await run_in_threadpool(engine.stop, True)  # uvicorn let the open requests finish; drain the rest
        engine.registry.close()  # the loader threads and the folder watcher

    app = FastAPI(title="lorakit serve", version="1", lifespan=lifespan)
    app.state.draining = False
    registry: reg.Registry = engine.registry
    _handlers(app, settings)
    app.add_middleware(Guard, max_body_bytes=settings.max_body_bytes, draining=lambda: app.state.draining)

    def auth(request: Request) -> str | None:
        given = request.headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else None
        if settings.api_key is not None and token not in (settings.api_key, settings.admin_key):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", "AuthenticationError")
        return token

    def admin(token: str | None = Depends(auth)) -> None:
        if settings.admin_key is None:
            raise ApiError(403, "adapter loading is off: start the server with --admin-key KEY", "PermissionDenied")
        if token != settings.admin_key:
            raise ApiError(401, "this endpoint needs the admin key: send `Authorization: Bearer ADMIN_KEY`",
                           "AuthenticationError")

    @app.get("/health", dependencies=[Depends(auth)])
    def health():
        alive = engine._thread is None or engine._thread.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(auth)])
    def metrics_text():
        if metrics is None:
            raise ApiError(404, "metrics are off", "NotFoundError")
        body, kind = metrics.render()
        return Response(body, media_type=kind)

    @app.get("/v1/models", dependencies=[Depends(auth)])
    def models():
        now = int(time.time())
        perm = {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": now,
                "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": False,
                "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                "organization": "*", "group": None, "is_blocking": False}
        cards = [{"id": settings.model_name, "object": "model", "created": now, "owned_by": "lorakit",
                  "root": settings.model_name, "parent": None, "max_model_len": settings.max_model_len,
                  "permission": [perm]}]
        cards += [{"id": n, "object": "model", "created": now, "owned_by": "lorakit", "root": n,
                   "parent": settings.model_name, "max_model_len": None, "permission": [perm]}
                  for n in registry.names()]
        return {"object": "list", "data": cards}

    @app.post("/v1/completions", dependencies=[Depends(auth)], responses=STREAM_DOC)
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt if isinstance(body.prompt, str) else (body.prompt or [None])[0]
        if prompt is None:
            raise bad("prompt must be a string (or a list of one string)", "prompt")
        ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return await _generate(body, ids, body.max_tokens or 16, "prompt", "text_completion", request)

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)], responses=STREAM_DOC)
    async def chat(body: ChatRequest, request: Request):
        text = render(engine.tokenizer, [m.model_dump() for m in body.messages])  # as `lorakit generate`
        ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
        default = min(256, max(1, settings.max_model_len - len(ids)))
        return await _generate(body, ids, body.max_completion_tokens or body.max_tokens or default, "messages",
                               "chat.completion", request)

    async def _generate(body: Sampling, ids: list[int], max_tokens: int, field: str, kind: str, request: Request):
        request.state.model = body.model
        if body.n != 1:
            raise bad(f"n={body.n} is not supported: this server returns one choice per request (n=1)", "n")
        try:
            adapter = registry.resolve(body.model)
        except reg.NotFound as e:
            raise ApiError(404, str(e), "NotFoundError", "model") from None
        failed = registry.failure(adapter) if adapter != BASE else None
        if failed is not None:  # this folder version is known to be unservable
            raise bad(failed, "model")
        limit = settings.max_model_len
        if not ids:
            raise bad(f"{field} is empty after tokenization", field)
        if len(ids) + max_tokens > limit:
            raise bad(f"This model's maximum context length is {limit} tokens. However, you requested "
                      f"{len(ids) + max_tokens} tokens ({len(ids)} in the {field}, {max_tokens} in max_tokens). "
                      "Shorten the prompt or lower max_tokens.", field if len(ids) >= limit else "max_tokens")
        if engine.depth()[1] >= settings.max_queue:
            raise ApiError(429, f"the queue is full ({settings.max_queue} waiting requests); retry shortly",
                           "RateLimitError", headers={"Retry-After": "1"})
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                seed=body.seed, stop=body.stops())
        loop = asyncio.get_running_loop()
        inbox = Mailbox(loop)
        req = engine.submit(EngineRequest(ids, adapter, params, Batched(loop, inbox.put)))
        head = {"id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex}",
                "created": int(time.time()), "model": body.model}
        request.state.logs_itself = True  # one line when the generation ends (_log_generation)
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(req, inbox, head, kind, usage, request), media_type="text/event-stream")
        return await _collect(req, inbox, head, kind, request)

    async def _next(req, inbox, request: Request):
        """The next delta; cancels the request (its slot freed at the next step) if the client left."""
        while True:
            d = await inbox.get(0.5)
            if d is not None:
                return d
            if await request.is_disconnected():
                engine.cancel(req)

    async def _collect(req, inbox, head, kind, request):
        parts = []
        while True:
            d = await _next(req, inbox, request)
            parts.append(d.text)
            if d.finish_reason is not None:
                break
        _log_generation(head, req, d, STATUS.get(d.finish_reason, 200))
        if d.finish_reason == "error":
            raise ApiError(400, d.error or "the request failed", "BadRequestError", "model")
        text = "".join(parts)
        choice = {"index": 0, "logprobs": None, "finish_reason": d.finish_reason,
                  "stop_reason": req.tracker.stopped}
        choice.update({"message": {"role": "assistant", "content": text}} if kind == "chat.completion"
                      else {"text": text})
        return {**head, "object": kind, "choices": [choice], "usage": _usage(d)}

    async def _sse(req, inbox, head, kind, include_usage, request):
        chat = kind == "chat.completion"
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text, finish=None, first=False):
            choice = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
            else:
                choice["text"] = text
            return "data: " + json.dumps({**head, "object": obj, "choices": [choice]}) + "\n\n"

        # a token's chunk: chunk(text) with the text spliced into the rest, rendered once (the same bytes)
        empty = chunk("")
        cut = empty.rindex('""')
        before, after = empty[:cut], empty[cut + 2:]

        try:
            if chat:
                yield chunk("", first=True)
            while True:
                d = await _next(req, inbox, request)
                if d.finish_reason is not None:
                    _log_generation(head, req, d, STATUS.get(d.finish_reason, 200))
                if d.finish_reason == "error":
                    yield "data: " + json.dumps({"error": {"message": d.error, "type": "BadRequestError",
                                                           "param": "model", "code": 400}}) + "\n\n"
                    break
                if d.finish_reason:
                    yield chunk(d.text, d.finish_reason)
                elif d.text:
                    yield before + json.dumps(d.text) + after
                if d.finish_reason is not None:
                    if include_usage:
                        yield "data: " + json.dumps({**head, "object": obj, "choices": [], "usage": _usage(d)}) + "\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not req.cancelled and (req in engine.running or req in engine.waiting):
                engine.cancel(req)  # the client went away mid-stream (Starlette cancels this generator)

    @app.post("/v1/load_lora_adapter", dependencies=[Depends(admin)], response_class=PlainTextResponse)
    async def load_lora(body: LoadAdapter):
        if registry.root is None:
            raise bad("this server was started without --adapters DIR: there is no folder to load from", "lora_path")
        try:
            registry.check_name(body.lora_name)
        except LorakitError as e:
            raise bad(str(e), "lora_name") from None
        try:
            path = reg.inside(registry.root, body.lora_path)
            if registry.taken(body.lora_name, path):  # loading a discovered folder under its own name: a warm-up
                raise bad(f"The lora adapter '{body.lora_name}' has already been loaded; unload it first.", "lora_name")
            await run_in_threadpool(registry.load_now, body.lora_name, path)  # checked before it is offered
            registry.add(body.lora_name, path)
            await asyncio.wrap_future(engine.call(lambda: registry.ready(body.lora_name, engine)))
        except reg.NotFound as e:
            raise ApiError(404, str(e), "NotFoundError", "lora_path") from None
        except LorakitError as e:
            raise bad(f"could not load adapter {body.lora_name!r}: {e}", "lora_path") from None
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", dependencies=[Depends(admin)], response_class=PlainTextResponse)
    async def unload_lora(body: UnloadAdapter):
        if body.lora_name not in registry.names():
            raise ApiError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "NotFoundError", "lora_name")
        try:
            await asyncio.wrap_future(engine.call(lambda: registry.unload(body.lora_name, engine)))
        except LorakitError as e:
            raise ApiError(409, str(e), "ConflictError", "lora_name") from None
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."

    return app


class Mailbox:
    """A request's deltas on its event loop: put() (on the loop) and get(timeout). An asyncio.Queue
    read through asyncio.wait_for costs a task and a timer per token; this costs one future and a timer."""

    def __init__(self, loop):
        self.loop, self.items, self.waiter = loop, collections.deque(), None

    def put(self, delta) -> None:
        self.items.append(delta)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def get(self, timeout: float):
        """The next delta, or None after `timeout` seconds without one."""
        if not self.items:
            self.waiter = waiter = self.loop.create_future()
            timer = self.loop.call_later(timeout, lambda: waiter.done() or waiter.set_result(None))
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None
        return self.items.popleft() if self.items else None


def _log_generation(head: dict, req, d, status: int) -> None:
    now = time.perf_counter()
    ttft = f"{req.t_first - req.t_arrival:.3f}s" if req.t_first is not None else "-"
    log.info("request %s model=%s prompt_tokens=%d completion_tokens=%d latency=%.3fs ttft=%s finish=%s status=%d",
             head["id"], head["model"], d.prompt_tokens, d.completion_tokens, now - req.t_arrival, ttft,
             d.finish_reason, status)


def _usage(d) -> dict:
    return {"prompt_tokens": d.prompt_tokens, "completion_tokens": d.completion_tokens,
            "total_tokens": d.prompt_tokens + d.completion_tokens}


def _handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(ApiError)
    async def _api(request, exc: ApiError):
        return error(exc.status, exc.message, exc.type, exc.param, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid body"}
        loc = [str(p) for p in first.get("loc", ())[1:]]
        param = ".".join(loc) or None
        return error(400, f"{param or 'body'}: {first.get('msg')}", "BadRequestError", param)

    @app.exception_handler(HTTPException)
    async def _http(request, exc: HTTPException):
        kind = {404: "NotFoundError", 405: "MethodNotAllowed"}.get(exc.status_code, "BadRequestError")
        return error(exc.status_code, str(exc.detail), kind)
