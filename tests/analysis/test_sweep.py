"""Sweeps: the grid is the product of the --set lists; a two-point sweep runs, resumes, and reports failures."""

import json

from lorakit.analysis.sweep import grid, point_name, split_values
from lorakit.cli import main


def test_grid_is_the_product_and_brackets_keep_their_commas():
    assert split_values("1,2,[a,b],{x: 1, y: 2}") == ["1", "2", "[a,b]", "{x: 1, y: 2}"]
    points = grid(["lora.r=1,2", "lora.target_modules=[q_proj,v_proj],all-linear", "train.max_steps=3"])
    assert len(points) == 4
    assert points[0] == {"lora.r": 1, "lora.target_modules": ["q_proj", "v_proj"], "train.max_steps": 3}
    assert points[-1] == {"lora.r": 2, "lora.target_modules": "all-linear", "train.max_steps": 3}
    assert point_name(points[0], ["lora.r", "lora.target_modules"]) == "r=1_target_modules=q_proj+v_proj"


def test_two_point_sweep_runs_resumes_and_reports_a_failed_point(tiny_model_dir, data_file, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(f"model: {tiny_model_dir}\ndata:\n  train: {data_file}\n  eval: {data_file}\n"
                                     "train:\n  max_steps: 3\n  batch_size: 4\n  learning_rate: 1.0e-2\n")
    out = tmp_path / "sw"
    argv = ["sweep", str(tmp_path / "c.yaml"), "--set", "lora.r=1,4", "--out", str(out), "--quiet", "--json"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = {r["name"]: r for r in summary["points"]}
    assert set(rows) == {"r=1", "r=4"} and not summary["failed"]
    assert rows["r=4"]["trainable"] == 4 * rows["r=1"]["trainable"] > 0  # LoRA parameters scale with r
    assert all(r["steps"] == 3 and r["eval_loss"] is not None for r in rows.values())
    for name in ("sweep.json", "sweep.md", "sweep.png", "r=1/adapter_model.safetensors", "r=4/metrics.jsonl"):
        assert (out / name).is_file(), name
    stamp = (out / "r=1" / "metrics.jsonl").stat().st_mtime_ns
    # rerun with a third point, one that fails (r=0 is refused): the finished two are not re-run
    assert main(["sweep", str(tmp_path / "c.yaml"), "--set", "lora.r=1,4,0", "--out", str(out), "--quiet", "--json"]) == 1
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["name"] for r in again["points"]] == ["r=1", "r=4"] and again["points"] == summary["points"]
    assert [f["name"] for f in again["failed"]] == ["r=0"] and "r" in again["failed"][0]["error"]
    assert (out / "r=1" / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert "failed" in (out / "sweep.md").read_text()
