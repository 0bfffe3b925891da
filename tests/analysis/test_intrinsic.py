"""Subspace training: θ0 + P·θd learns on a tiny model; d90 is read right; the measurement resumes."""

import json

import pytest
import torch

from lorakit import LorakitError
from lorakit.analysis.intrinsic import d90, measure
from lorakit.analysis.projection import Projection
from lorakit.cli import main

from conftest import model_with_adapter, run_config, tiny_llama


def test_d90_from_a_known_curve():
    points = [{"d": 10, "value": 0.1}, {"d": 100, "value": 0.5}, {"d": 1000, "value": 0.83}, {"d": 30, "value": 0.2}]
    assert d90(points, base=0.0, reference=0.9, higher_is_better=True) == 1000  # needs 0.81
    assert d90(points, base=0.0, reference=0.5, higher_is_better=True) == 100  # needs 0.45
    losses = [{"d": 10, "value": 3.0}, {"d": 100, "value": 2.2}, {"d": 1000, "value": 2.05}]
    assert d90(losses, base=4.0, reference=2.0, higher_is_better=False) == 100  # needs <= 2.2: reached exactly
    assert d90(losses, base=4.0, reference=1.9, higher_is_better=False) == 1000  # needs <= 2.11
    assert d90(points, base=0.0, reference=2.0, higher_is_better=True) is None  # never reached
    assert d90(points, base=0.5, reference=0.4, higher_is_better=True) is None  # the reference did not help


def test_only_theta_trains_and_restore_gives_theta0_back():
    for over, model in [("adapter", model_with_adapter("llama")), ("model", tiny_llama(tie=True))]:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        proj = Projection(model, over, 40, said=True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert {id(p) for p in trainable} == {id(p) for p in proj.space.parameters()}
        assert proj.space.theta.numel() + proj.space.lam.numel() == 40  # SAID: d - m and m
        ids = torch.randint(0, 96, (2, 9))
        model(input_ids=ids, labels=ids).loss.backward()
        assert proj.space.theta.grad.abs().sum() > 0
        with torch.no_grad():
            proj.space.theta.normal_()
        proj.bake()
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
        if over == "model":
            assert model.lm_head.weight is model.model.embed_tokens.weight  # ties kept through bake
        proj.restore()
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_said_needs_d_above_the_tensor_count():
    with pytest.raises(LorakitError, match="d must exceed"):
        Projection(model_with_adapter("llama"), "adapter", 5, said=True)


def test_subspace_training_lowers_eval_loss_and_resumes(tiny_model_dir, data_file, tmp_path, capsys):
    cfg = run_config(tiny_model_dir, data_file, tmp_path / "run", "train.max_steps=16", f"data.eval={data_file}")
    out = tmp_path / "id"
    result = measure(cfg, [8, 400], over="adapter", metric="eval_loss", lr=0.2, out=out, progress=False)
    assert result["metric"] == "eval_loss" and result["higher_is_better"] is False
    values = {p["d"]: p["value"] for p in result["points"]}
    assert result["reference"] < result["base"] - 0.05
    assert values[400] < result["base"] - 0.02, (result, values)  # d=400 numbers learn
    assert (out / "intrinsic.png").is_file() and (out / "reference" / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "intrinsic.json").read_text())
    assert saved["result"] == result
    # a rerun with one more d trains only that one (through the CLI, --json on the last line)
    (tmp_path / "c.yaml").write_text("")
    argv = ["intrinsic-dim", str(tmp_path / "c.yaml"), "--dims", "8,400,50", "--metric", "eval_loss", "--lr", "0.2",
            "--out", str(out), "--quiet", "--json"]
    for item in [f"model={tiny_model_dir}", f"data.train={data_file}", f"data.eval={data_file}",
                 f"output_dir={tmp_path / 'run'}", "train.batch_size=4", "train.learning_rate=1e-2", "lora.r=4",
                 "train.warmup_steps=2", "train.max_steps=16"]:
        argv += ["--set", item]
    capsys.readouterr()
    assert main(argv) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [p["d"] for p in last["points"]] == [8, 50, 400]
    again = json.loads((out / "intrinsic.json").read_text())
    assert again["points"]["8"] == saved["points"]["8"] and again["points"]["400"] == saved["points"]["400"]
    assert not (out / "d-8" / "metrics.jsonl").stat().st_mtime > (out / "d-50" / "metrics.jsonl").stat().st_mtime


def test_other_settings_in_the_same_folder_are_refused(tiny_model_dir, data_file, tmp_path):
    cfg = run_config(tiny_model_dir, data_file, tmp_path / "run", "train.max_steps=2", f"data.eval={data_file}")
    measure(cfg, [8], metric="eval_loss", out=tmp_path / "id", progress=False)
    with pytest.raises(LorakitError, match="other settings"):
        measure(cfg, [8], metric="eval_loss", lr=0.5, out=tmp_path / "id", progress=False)
