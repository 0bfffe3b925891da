"""A real `lorakit serve` process: SIGTERM mid-stream drains (the stream finishes, new requests get 503
in the API's error shape, exit status 0), and one log line per request."""

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from serving import adapters_dir, server  # noqa: F401  (fixtures)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drains_mid_stream_then_exits_0(tiny_model_dir, adapters_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(tiny_model_dir), "--adapters",
                             str(adapters_dir), "--port", str(port), "--threads", "1", "--max-model-len", "256"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert httpx.post(url + "/v1/completions", json={"model": "a1", "prompt": "hi", "max_tokens": 2},
                          timeout=60).status_code == 200
        chunks, started = [], threading.Event()

        def stream():
            body = {"model": "a0", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks.append(line[6:])
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.05)
        late = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
        assert late.status_code == 503, late.text
        assert late.json()["error"]["type"] == "ServiceUnavailableError" and late.json()["error"]["code"] == 503
        reader.join(120)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert chunks[-1] == "[DONE]"
    usage = json.loads(chunks[-2])["usage"]
    assert usage["completion_tokens"] == 200  # the in-flight stream ran to its end
    log.seek(0)
    lines = log.read().splitlines()
    done = [ln for ln in lines if "request cmpl-" in ln]
    assert any("model=a0" in ln and "completion_tokens=200" in ln and "status=200" in ln and "latency=" in ln
               and "prompt_tokens=" in ln for ln in done), lines
    assert any("model=a1" in ln and "completion_tokens=2" in ln for ln in done)
    assert any("status=503" in ln for ln in lines) and any("draining" in ln for ln in lines)
    assert any("mixed-adapter decoding: the BGMV kernel" in ln for ln in lines)  # the CPU default, built


def test_one_log_line_per_request_and_503_while_draining(server, caplog):
    c = server.client("secret")
    with caplog.at_level(logging.INFO, logger="lorakit.serve"):
        c.completions.create(model="a2", prompt="The sky", max_tokens=3, temperature=0)
        with pytest.raises(Exception):
            c.completions.create(model="nope", prompt="x", max_tokens=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "lorakit.serve"]
    done = [ln for ln in lines if ln.startswith("request cmpl-")]
    assert len(done) == 1 and "model=a2" in done[0] and "completion_tokens=3" in done[0] and "status=200" in done[0]
    assert re.search(r"prompt_tokens=\d+ .*latency=\d+\.\d+s ttft=\d+\.\d+s finish=length", done[0])
    assert any("model=nope status=404" in ln for ln in lines)
    assert len([ln for ln in lines if "/v1/completions" in ln or "cmpl-" in ln]) == 2  # one line each
    app = server.server.config.app
    app.state.draining = True
    try:
        r = httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                       headers={"Authorization": "Bearer secret"}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == 503 and r.headers["retry-after"]
    finally:
        app.state.draining = False
