"""The page's JSON endpoints over real HTTP on loopback: runs, metrics, adapter reports, similarity,
path containment, the API key and the server's error shape."""

import json
import os

import httpx
import pytest

from lorakit.analysis.report import inspect_adapter
from lorakit.analysis.subspace import compare_adapters
from lorakit.train.logbook import read_metrics
from pages import adapters_dir, page_alone, page_served, start_page, trained_runs  # noqa: F401  (fixtures)

KEY = {"Authorization": "Bearer secret"}


def get(server, path, **kw):
    return httpx.get(server.url + path, timeout=60, **kw)


def test_runs_list_and_one_run(page_alone, trained_runs):
    runs = {r["id"]: r for r in get(page_alone, "/ui/api/runs").json()["runs"]}
    assert set(runs) == {"fast", "sweep/slow"}
    assert all(r["status"] == "finished" and r["final"]["steps"] == 6 for r in runs.values())
    rows = read_metrics(trained_runs / "fast" / "metrics.jsonl")
    assert runs["fast"]["final"]["loss"] == [r["loss"] for r in rows if "loss" in r][-1]
    assert runs["fast"]["final"]["eval_loss"] == [r["eval_loss"] for r in rows if "eval_loss" in r][-1]
    run = get(page_alone, "/ui/api/run", params={"id": "sweep/slow"}).json()
    assert run["flat"]["train.learning_rate"] == 1e-3 and run["config"]["train"]["max_steps"] == 6
    assert run["adapter"] is True


def test_metrics_follow_the_file(page_alone, trained_runs):
    path = trained_runs / "fast" / "metrics.jsonl"
    whole = get(page_alone, "/ui/api/metrics", params={"id": "fast"}).json()
    assert whole["rows"] == read_metrics(path) and whole["offset"] == path.stat().st_size
    tail = get(page_alone, "/ui/api/metrics", params={"id": "fast", "offset": whole["offset"]}).json()
    assert tail["rows"] == [] and tail["file"] == whole["file"]
    cut = len(path.read_text().splitlines(keepends=True)[0].encode())
    assert get(page_alone, "/ui/api/metrics", params={"id": "fast", "offset": cut}).json()["rows"] == whole["rows"][1:]


@pytest.mark.parametrize("path,params,status", [
    ("/ui/api/run", {"id": "../fast"}, 400), ("/ui/api/run", {"id": "/etc"}, 400),
    ("/ui/api/run", {"id": "outside"}, 400), ("/ui/api/metrics", {"id": "outside"}, 400),
    ("/ui/api/run", {"id": "nope"}, 404), ("/ui/api/run", {"id": "sweep"}, 404), ("/ui/api/run", {}, 400),
    ("/ui/api/metrics", {"id": "fast", "offset": "-3"}, 400), ("/ui/api/metrics", {"id": "fast", "offset": "x"}, 400),
    ("/ui/api/adapter", {"id": "a1"}, 400), ("/ui/api/adapter", {"id": "adapters:../a1"}, 400),
    ("/ui/api/adapter", {"id": "adapters:nope"}, 404), ("/ui/api/adapter", {"id": "runs:sweep"}, 404),
    ("/ui/api/adapter", {"id": "models:a1"}, 400), ("/ui/api/similarity", {"a": "adapters:a1"}, 400),
    ("/ui/api/nothing", {}, 404), ("/ui/static/../api.py", {}, 404),
])
def test_bad_requests_get_4xx_in_the_api_error_shape(page_alone, trained_runs, tmp_path_factory, path, params, status):
    if not (trained_runs / "outside").exists():
        os.symlink(tmp_path_factory.mktemp("elsewhere"), trained_runs / "outside")
    r = get(page_alone, path, params=params)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == status and err["message"] and err["type"].endswith("Error")


def test_adapter_report_and_similarity_are_the_analysis_functions(page_alone, adapters_dir, trained_runs):
    listed = {a["id"]: a for a in get(page_alone, "/ui/api/adapters").json()["adapters"]}
    assert {"adapters:a0", "adapters:a7", "runs:fast", "runs:sweep/slow"} <= set(listed)
    assert listed["adapters:a3"]["r"] == 4 and listed["runs:fast"]["source"] == "runs"
    report = get(page_alone, "/ui/api/adapter", params={"id": "adapters:a3"}).json()
    want = inspect_adapter(adapters_dir / "a3")
    assert report["modules"] == json.loads(json.dumps(want["modules"])) and report["parameters"] == want["parameters"]
    sim = get(page_alone, "/ui/api/similarity", params={"a": "adapters:a1", "b": "runs:fast"}).json()
    ref = compare_adapters(adapters_dir / "a1", trained_runs / "fast")
    assert [m["phi"] for m in sim["modules"]] == [m["phi"] for m in ref["modules"]]
    r = len(sim["mean"])
    mean = sum(m["phi"][r - 1][r - 1] for m in ref["modules"]) / len(ref["modules"])
    assert r == 4 and abs(sim["mean"][r - 1][r - 1] - mean) < 1e-5


def test_page_and_its_files_are_served(page_alone):
    html = get(page_alone, "/")
    assert html.status_code == 200 and "<title>lorakit</title>" in html.text
    for name in ("uPlot.iife.min.js", "common.js", "runs.js", "adapters.js", "playground.js", "style.css"):
        assert f"/ui/static/{name}" in html.text and get(page_alone, f"/ui/static/{name}").status_code == 200
    assert "MIT License" in get(page_alone, "/ui/static/uPlot.LICENSE").text
    info = get(page_alone, "/ui/api/info").json()
    assert info["model"] is None and "needs a model" in info["playground"]


def test_without_runs_folder_the_run_endpoints_say_so(adapters_dir):
    s = start_page(None, adapters_dir)
    try:
        r = get(s, "/ui/api/runs")
        assert r.status_code == 404 and "--runs" in r.json()["error"]["message"]
        assert len(get(s, "/ui/api/adapters").json()["adapters"]) == 8
    finally:
        s.stop()


def test_served_page_wants_the_key_and_shares_the_server(page_served):
    assert get(page_served, "/").status_code == 200  # the page itself carries no data
    no_key = get(page_served, "/ui/api/runs")
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "AuthenticationError"
    assert get(page_served, "/ui/api/runs", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert len(get(page_served, "/ui/api/runs", headers=KEY).json()["runs"]) == 2
    assert get(page_served, "/ui/api/info", headers=KEY).json()["model"] == "tiny"
    assert get(page_served, "/v1/models", headers=KEY).json()["data"][0]["id"] == "tiny"
    bad = get(page_served, "/ui/api/run", params={"id": "../x"}, headers=KEY)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "id"


def test_broken_adapters_get_400_naming_the_problem(tmp_path, trained_runs):
    import shutil
    for name in ("config", "tensors", "missing", "zero"):
        (tmp_path / name).mkdir()
    (tmp_path / "config" / "adapter_config.json").write_text('{"r": 4')
    for name in ("tensors", "missing", "zero"):
        shutil.copy(trained_runs / "fast" / "adapter_config.json", tmp_path / name)
    (tmp_path / "tensors" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    import torch
    from safetensors.torch import load_file, save_file
    trained = load_file(trained_runs / "fast" / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in trained.items()}, tmp_path / "zero" / "adapter_model.safetensors")
    s = start_page(trained_runs, tmp_path)
    try:
        listed = {a["id"]: a for a in get(s, "/ui/api/adapters").json()["adapters"]}
        assert "unreadable" in listed["adapters:config"]["problem"]
        for name, words in (("config", "not valid JSON"), ("tensors", "safetensors"), ("missing", "not found")):
            r = get(s, "/ui/api/adapter", params={"id": f"adapters:{name}"})
            assert r.status_code == 400 and words in r.json()["error"]["message"], (name, r.text)
        r = get(s, "/ui/api/similarity", params={"a": "adapters:zero", "b": "runs:fast"})
        assert r.status_code == 400 and "zero update" in r.json()["error"]["message"]
    finally:
        s.stop()
