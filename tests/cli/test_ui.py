"""`lorakit ui` and the page under `lorakit serve`, as processes on loopback (the real entry point)."""

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from lorakit.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, ready_path="/ui/api/info", headers=None, timeout=120):
    """`python -m lorakit.cli ARGS --port P` until it answers; (process, base url)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", *args, "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{args} exited {proc.returncode}: {proc.stdout.read()}")
        try:
            httpx.get(url + ready_path, headers=headers, timeout=2)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail(f"{args} did not answer within {timeout} s")


def stop(proc):
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def runs(tmp_path):
    folder = tmp_path / "runs" / "one"
    folder.mkdir(parents=True)
    (folder / "run.yaml").write_text("name: one\n")
    (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.25}) + "\n")
    return tmp_path / "runs"


def test_ui_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["ui", "--runs", str(tmp_path / "nope")]) == 2
    assert "--runs" in capsys.readouterr().err


@pytest.mark.slow  # a fresh interpreter importing torch: about 20 s here
def test_ui_without_a_model_serves_runs(runs):
    proc, url = start(["ui", "--runs", str(runs)])
    try:
        got = httpx.get(url + "/ui/api/runs").json()["runs"]
        assert [r["id"] for r in got] == ["one"] and got[0]["final"]["loss"] == 1.25
        assert "<title>lorakit</title>" in httpx.get(url + "/").text
        assert httpx.get(url + "/v1/models").status_code == 404  # no model: no API, the page says so
    finally:
        stop(proc)


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["serve", "ui"])
def test_with_a_model_the_page_is_at_root_of_the_server(tiny_model_dir, runs, verb):
    key = {"Authorization": "Bearer k"}
    proc, url = start([verb, "--model", str(tiny_model_dir), "--runs", str(runs), "--api-key", "k"],
                      "/health", headers=key)
    try:
        assert httpx.get(url + "/").status_code == 200
        assert httpx.get(url + "/v1/models", headers=key).json()["data"][0]["id"] == str(tiny_model_dir)
        assert httpx.get(url + "/ui/api/info", headers=key).json()["model"] == str(tiny_model_dir)
        assert httpx.get(url + "/ui/api/runs").status_code == 401
        assert httpx.get(url + "/ui/api/runs", headers=key).json()["runs"][0]["id"] == "one"
    finally:
        stop(proc)
