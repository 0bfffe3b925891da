"""Run folders for the page: found under a root, their metrics read from byte offsets, final figures."""

import json
import os
import time

import pytest

from lorakit import LorakitError
from lorakit.ui import runs
from lorakit.ui.folders import Missing, Refused


def write_run(folder, rows, config="name: x\ntrain:\n  learning_rate: 0.01\n", adapter=False):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run.yaml").write_text(config)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if adapter:
        time.sleep(0.01)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    return folder


ROWS = [{"step": 1, "loss": 2.0, "lr": 0.01, "grad_norm": 1.5, "tokens": 100, "tokens_per_s": 50.0, "elapsed_s": 2.0},
        {"step": 2, "loss": 1.5, "lr": 0.005, "grad_norm": 1.0, "tokens": 200, "tokens_per_s": 60.0, "elapsed_s": 4.0},
        {"step": 2, "eval_loss": 1.7, "eval_perplexity": 5.47}]


def test_find_runs_walks_sweeps_and_skips_checkpoints_and_symlinks_out(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "a", ROWS, adapter=True)
    write_run(root / "sweep" / "r=1", ROWS[:1])
    write_run(root / "sweep" / "r=2", ROWS[:2])
    write_run(root / "a" / "checkpoints" / "step-1", ROWS)  # inside a run: never a run of its own
    write_run(tmp_path / "elsewhere", ROWS)
    os.symlink(tmp_path / "elsewhere", root / "link")
    (root / "empty").mkdir()
    found = {r["id"]: r for r in runs.find_runs(root)}
    assert set(found) == {"a", "sweep/r=1", "sweep/r=2"}
    assert found["a"]["status"] == "finished" and found["sweep/r=1"]["status"] == "training"
    assert found["a"]["final"] == {"steps": 2, "loss": 1.5, "lr": 0.005, "tokens": 200, "elapsed_s": 4.0,
                                   "tokens_per_s": 50.0, "eval_loss": 1.7, "best_eval_loss": 1.7,
                                   "eval_perplexity": 5.47}
    with pytest.raises(LorakitError, match="not a folder"):
        runs.find_runs(tmp_path / "nope")


def test_stopped_when_the_log_went_quiet_without_a_final_adapter(tmp_path):
    folder = write_run(tmp_path / "r", ROWS)
    old = time.time() - runs.LIVE_S - 5
    os.utime(folder / "metrics.jsonl", (old, old))
    assert runs.summary(tmp_path, folder)["status"] == "stopped"
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    assert runs.summary(tmp_path, folder)["status"] == "finished"
    os.utime(folder / "adapter_model.safetensors", (old - 10, old - 10))  # a resumed run: run.yaml is newer
    assert runs.summary(tmp_path, folder)["status"] == "stopped"


def test_metrics_from_offsets_wait_for_whole_lines(tmp_path):
    folder = write_run(tmp_path / "r", ROWS[:2])
    first = runs.read_metrics_from(tmp_path, "r", 0)
    assert first["rows"] == ROWS[:2] and first["offset"] == (folder / "metrics.jsonl").stat().st_size
    line = json.dumps(ROWS[2]) + "\n"
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(line[:10])  # a row being written
    part = runs.read_metrics_from(tmp_path, "r", first["offset"])
    assert part["rows"] == [] and part["offset"] == first["offset"] and part["file"] == first["file"]
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(line[10:])
    rest = runs.read_metrics_from(tmp_path, "r", part["offset"])
    assert rest["rows"] == [ROWS[2]] and rest["offset"] == rest["size"]
    tmp = folder / "metrics.tmp"  # a resume rewrites the log atomically: a new file
    tmp.write_text(json.dumps(ROWS[0]) + "\n")
    os.replace(tmp, folder / "metrics.jsonl")
    again = runs.read_metrics_from(tmp_path, "r", rest["offset"])
    assert again["file"] != rest["file"] and again["offset"] <= again["size"]
    assert runs.read_metrics_from(tmp_path, "r", 0)["rows"] == [ROWS[0]]


def test_torn_and_non_finite_rows_are_left_out(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": 2, "lo\n[1, 2]\n'
                                          '{"step": 3, "loss": 1.0}\n')
    rows = runs.read_metrics_from(tmp_path, "r", 0)["rows"]
    assert rows == [{"step": 1, "loss": None}, {"step": 3, "loss": 1.0}]
    assert runs.final_metrics(rows)["loss"] == 1.0


def test_read_run_gives_the_resolved_config_nested_and_flat(tmp_path):
    write_run(tmp_path / "r", ROWS)
    run = runs.read_run(tmp_path, "r")
    assert run["config"] == {"name": "x", "train": {"learning_rate": 0.01}}
    assert run["flat"] == {"name": "x", "train.learning_rate": 0.01}
    (tmp_path / "r" / "run.yaml").write_text("a: [unclosed\n")
    assert "not valid YAML" in runs.read_run(tmp_path, "r")["config"]["_unreadable"]
    (tmp_path / "plain").mkdir()
    with pytest.raises(Missing, match="not a run folder"):
        runs.read_run(tmp_path, "plain")
    with pytest.raises(Refused):
        runs.read_run(tmp_path, "../r")


def test_summaries_are_reused_only_while_the_log_is_unchanged(tmp_path):
    folder = write_run(tmp_path / "r", ROWS[:1])
    cache = runs.Summaries()
    assert runs.find_runs(tmp_path, cache)[0]["final"]["loss"] == 2.0
    with open(folder / "metrics.jsonl", "a") as f:
        f.write(json.dumps(ROWS[1]) + "\n")
    assert runs.find_runs(tmp_path, cache)[0]["final"]["loss"] == 1.5  # the size changed: read again
    (folder / "metrics.jsonl").unlink()
    assert runs.find_runs(tmp_path, cache)[0]["final"] == {"steps": 0}


def test_a_slow_run_counts_as_training_for_three_of_its_steps(tmp_path):
    slow = [{"step": 1, "loss": 1.0, "elapsed_s": 200.0}, {"step": 2, "loss": 0.9, "elapsed_s": 400.0}]
    folder = write_run(tmp_path / "r", slow)
    quiet = time.time() - 500  # 500 s without a row: quiet for a 2-s step, not for a 200-s one
    os.utime(folder / "metrics.jsonl", (quiet, quiet))
    assert runs.summary(tmp_path, folder)["status"] == "training"
    write_run(tmp_path / "q", ROWS[:2])
    os.utime(tmp_path / "q" / "metrics.jsonl", (quiet, quiet))
    assert runs.summary(tmp_path, tmp_path / "q")["status"] == "stopped"
