"""The outer ASGI guard of the server: bounded bodies, draining, a bug answered as a 500 in the API's error
shape (never a traceback), one access-log line; and the per-request mailbox the endpoints read deltas from."""

import asyncio
import logging

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from lorakit.serve.app import Mailbox
from lorakit.serve.guard import Guard


def guarded(draining=lambda: False):
    app = FastAPI()

    @app.post("/echo")
    async def echo(request: Request):
        request.state.model = "m1"
        return {"n": len(await request.body())}

    @app.get("/bug")
    async def bug():
        raise RuntimeError("a bug of ours")

    @app.get("/stream")
    async def stream(request: Request):
        request.state.logs_itself = True

        async def parts():
            for i in range(3):
                yield f"data: {i}\n\n"
        return StreamingResponse(parts(), media_type="text/event-stream")

    app.add_middleware(Guard, max_body_bytes=10, draining=draining)
    return app


def call(app, method, path, **kw):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                                     base_url="http://t") as c:
            return await c.request(method, path, **kw)
    return asyncio.run(go())


def test_bodies_bounded_bugs_are_500_in_api_shape_and_one_log_line(caplog):
    app = guarded()
    with caplog.at_level(logging.INFO, logger="lorakit.serve"):
        ok = call(app, "POST", "/echo", content=b"12345")
        big = call(app, "POST", "/echo", content=b"x" * 11)
        bug = call(app, "GET", "/bug")
        stream = call(app, "GET", "/stream")
    assert ok.status_code == 200 and ok.json() == {"n": 5}
    assert big.status_code == 413 and big.json()["error"]["code"] == 413 and "10 bytes" in big.json()["error"]["message"]
    assert bug.status_code == 500 and bug.json()["error"] == {"message": "internal error", "type": "InternalServerError",
                                                             "param": None, "code": 500}
    assert "a bug of ours" not in bug.text
    assert stream.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    lines = [r.getMessage() for r in caplog.records if r.name == "lorakit.serve" and r.getMessage().startswith("request ")]
    assert any(ln.startswith("request POST /echo model=m1 status=200 latency=") for ln in lines)
    assert any(ln.startswith("request GET /bug status=500") for ln in lines)
    assert not any("/stream" in ln for ln in lines)  # it logs itself


def test_draining_answers_503_with_retry_after():
    r = call(guarded(draining=lambda: True), "POST", "/echo", content=b"1")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["type"] == "ServiceUnavailableError"


def test_mailbox_delivers_in_order_and_times_out():
    async def go():
        box = Mailbox(asyncio.get_running_loop())
        assert await box.get(0.01) is None  # nothing came: None after the timeout
        asyncio.get_running_loop().call_later(0.01, box.put, "a")
        first = await box.get(5)  # woken by put, long before the timeout
        box.put("b"), box.put("c")
        return first, await box.get(5), await box.get(5)
    assert asyncio.run(go()) == ("a", "b", "c")
