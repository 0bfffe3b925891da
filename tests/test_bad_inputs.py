"""The catalogue of docs/reliability.md: wrong results, lost work and bad input, one test per row.

Each test is what a user did (or a fault that happened) and what lorakit must do instead of a wrong
number, a lost run or a traceback from deep inside a library. The fault-injection tests (kills, full
disks, torn files) are in tests/train/test_faults.py.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import LoraConfig, LorakitError
from lorakit.cli import main
from lorakit.train import NonFiniteLoss, load_run, train
from conftest import logits, run_config, tiny_llama


def _finite(folder) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(folder / "adapter_model.safetensors").values())


# -- wrong results -----------------------------------------------------------------------------------------

def test_dora_resume_equals_the_uninterrupted_run(tiny_model_dir, data_file, tmp_path):
    """The DoRA norm cache outlived fused AdamW steps: resumed runs drifted by 4e-3..8e-3."""
    extra = ["lora.variant=dora", "train.schedule=constant", "lora.dropout=0.1"]  # dropout: the RNG resumes too
    straight = tmp_path / "straight"
    train(run_config(tiny_model_dir, data_file, straight, *extra, "train.max_steps=8"), progress=False)
    cut = tmp_path / "cut"
    train(run_config(tiny_model_dir, data_file, cut, *extra, "train.max_steps=4"), progress=False)
    train(run_config(tiny_model_dir, data_file, cut, *extra, "train.max_steps=8"), resume=True, progress=False)
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_nan_guard_never_applies_a_non_finite_step(tiny_model_dir, data_file, tmp_path):
    """At lr 1e6 the gradient of step 2 is NaN while its loss is still finite (the case of the issue). The guard
    stops before applying it, leaves a finite adapter and a finite latest checkpoint of step 1, and that
    checkpoint is the exact state: resuming it meets the same NaN at the same step, and changes nothing."""
    cfg = ["train.max_steps=20", "train.learning_rate=1e6", "train.max_grad_norm=0", "train.warmup_steps=0"]
    with pytest.raises(NonFiniteLoss, match=r"at step (\d+).*not applied.*checkpoint .*latest.*--resume") as first:
        train(run_config(tiny_model_dir, data_file, tmp_path, *cfg), progress=False)
    latest = tmp_path / "checkpoints" / (tmp_path / "checkpoints/latest").read_text().strip()
    assert _finite(latest) and _finite(tmp_path)
    saved = load_file(latest / "adapter_model.safetensors")
    with pytest.raises(NonFiniteLoss) as again:
        train(run_config(tiny_model_dir, data_file, tmp_path, *cfg), resume=True, progress=False)
    assert str(again.value).split(";")[0] == str(first.value).split(";")[0]  # same step, same loss
    assert all(torch.equal(saved[k], v) for k, v in load_file(latest / "adapter_model.safetensors").items())


@pytest.mark.parametrize("override, match", [
    ("train.lora_plus_ratio=-4", r"train.lora_plus_ratio must be > 0"),
    ("data.train_on_prompt='false'", r"data.train_on_prompt must be true or false \(without quotes\)"),
])
def test_config_values_that_used_to_be_taken(override, match, tmp_path):
    with pytest.raises(LorakitError, match=match):
        load_run(None, overrides=["data.train=t.jsonl", override])


@pytest.mark.parametrize("limit", ["0", "-7"])
def test_eval_limit_must_be_positive(limit, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--data", "x.jsonl", "--metric", "perplexity", "--limit", limit])
    assert e.value.code == 2 and "must be >= 1" in capsys.readouterr().err


def test_loading_a_second_adapter_keeps_the_trained_one_trainable(tmp_path):
    """PEFT keeps the adapter being trained trainable when another is loaded for inference."""
    model = lorakit.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    other = lorakit.add_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(other, tmp_path)
    model.load_adapter(tmp_path, "other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default" in n for n in trainable)
    assert not any(".other" in n for n in trainable)


def test_save_pretrained_after_merge_and_unload_says_why(tmp_path):
    model = lorakit.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.merge_and_unload()
    with pytest.raises(LorakitError, match="no adapter to save.*merge_and_unload"):
        model.save_pretrained(tmp_path)


def test_merge_out_a_file_is_refused(tiny_model_dir, tmp_path, capsys):
    adapter = lorakit.add_adapter(lorakit.load_model(str(tiny_model_dir))[0], LoraConfig(target_modules=["q_proj"]))
    lorakit.save_adapter(adapter, tmp_path / "a")
    (tmp_path / "out.bin").write_text("keep me")
    code = main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "a"), "--out",
                 str(tmp_path / "out.bin")])
    captured = capsys.readouterr()
    assert code == 2 and "is a file" in captured.err and "written" not in captured.out
    assert (tmp_path / "out.bin").read_text() == "keep me"


# -- work lost -------------------------------------------------------------------------------------------

def test_a_new_run_refuses_a_folder_holding_another_run(tiny_model_dir, data_file, tmp_path):
    train(run_config(tiny_model_dir, data_file, tmp_path / "run", "train.max_steps=6", "train.save_every=3"),
          progress=False)
    before = sorted(p.name for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(LorakitError, match="already holds a run.*--resume.*output_dir.*--overwrite"):
        train(run_config(tiny_model_dir, data_file, tmp_path / "run", "train.max_steps=2"), progress=False)
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == before  # nothing touched
    train(run_config(tiny_model_dir, data_file, tmp_path / "run", "train.max_steps=2"), progress=False,
          overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert len(aside) == 1 and (aside[0] / "checkpoints/step-000006").is_dir()  # the old run, whole
    assert json.loads((tmp_path / "run/metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_ctrl_c_during_the_final_evaluation_keeps_the_trained_adapter(tiny_model_dir, data_file, tmp_path,
                                                                        monkeypatch):
    from lorakit.train import hooks
    monkeypatch.setattr(hooks.EvalHook, "evaluate", lambda self, state: (_ for _ in ()).throw(KeyboardInterrupt))
    cfg = run_config(tiny_model_dir, data_file, tmp_path, "train.max_steps=6", f"data.eval={data_file}")
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and t.abs().sum() > 0 for k, t in saved.items())  # trained, not init


def test_resume_applies_a_new_learning_rate_and_says_so(tiny_model_dir, data_file, tmp_path, capsys):
    same = ["train.schedule=constant", "train.warmup_steps=0"]
    train(run_config(tiny_model_dir, data_file, tmp_path, "train.max_steps=4", *same), progress=False)
    train(run_config(tiny_model_dir, data_file, tmp_path, "train.max_steps=6", *same, "train.learning_rate=5e-3"),
          resume=True)
    out = capsys.readouterr().out
    assert "changed train.learning_rate: 0.01 -> 0.005" in out and "changed train.max_steps: 4 -> 6" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == [1e-2] * 4 + [5e-3] * 2


@pytest.mark.parametrize("change, key", [("train.batch_size=2", "train.batch_size"),
                                         ("train.seed=3", "train.seed"), ("data", "data.train.sha256")])
def test_resume_refuses_a_changed_data_stream(change, key, tiny_model_dir, data_file, tmp_path):
    train(run_config(tiny_model_dir, data_file, tmp_path / "run", "train.max_steps=4", "train.save_every=2"),
          progress=False)
    data = data_file
    if change == "data":
        data = tmp_path / "other.jsonl"
        data.write_text(data_file.read_text().replace("cat", "cow"))
        change = f"data.train={data}"
    with pytest.raises(LorakitError, match=rf"(?s)changed in what defines.*\n  {key}:"):
        train(run_config(tiny_model_dir, data, tmp_path / "run", "train.max_steps=6", change), resume=True,
              progress=False)


def test_outputs_never_overwrite_inputs(tiny_model_dir, tmp_path, capsys):
    model = lorakit.load_model(str(tiny_model_dir))[0]
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    for name in "ab":
        lorakit.save_adapter(model, tmp_path / name)
    before = (tmp_path / "b/adapter_model.safetensors").read_bytes()
    assert main(["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1", "1", "--out",
                 str(tmp_path / "b")]) == 2
    assert "never overwrite inputs" in capsys.readouterr().err
    assert (tmp_path / "b/adapter_model.safetensors").read_bytes() == before
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    assert main(["merge", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "a"), "--out",
                 str(tiny_model_dir)]) == 2
    assert "never overwrite inputs" in capsys.readouterr().err
    assert (tiny_model_dir / "model.safetensors").read_bytes() == weights


# -- clear errors instead of tracebacks ---------------------------------------------------------------------

def test_non_utf8_data_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(LorakitError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        lorakit.data.load_records(path)


def test_a_json_file_holding_one_object(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"data": [{"prompt": "a", "completion": "b"}]}, indent=2))
    with pytest.raises(LorakitError, match="holds one JSON object.*not an array of records"):
        lorakit.data.load_records(path)


def test_exact_match_on_text_records(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "plain text"}\n')
    assert main(["eval", "--data", str(path), "--metric", "exact_match"]) == 2
    assert "'text' records" in capsys.readouterr().err


def test_an_adapter_config_that_is_a_list(tmp_path):
    lorakit.save_adapter(lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"])), tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(LorakitError, match="holds a JSON list, not an object"):
        lorakit.read_adapter(tmp_path)


def test_a_nan_adapter_in_inspect_and_combine(tmp_path, capsys):
    lorakit.save_adapter(lorakit.add_adapter(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"])), tmp_path / "a")
    tensors = load_file(tmp_path / "a/adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / "a/adapter_model.safetensors")
    assert main(["inspect", str(tmp_path / "a")]) == 2
    assert "NaN/Inf" in capsys.readouterr().err
    assert main(["combine", str(tmp_path / "a"), "--weights", "1", "--out", str(tmp_path / "c")]) == 2
    assert "NaN/Inf" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_inspect_png_into_a_missing_folder(tmp_path, capsys):
    lorakit.save_adapter(lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"])), tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a"), "--png", str(tmp_path / "no/such/x.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_save_pretrained_of_an_unknown_adapter(tmp_path):
    model = lorakit.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(LorakitError, match=r"selected_adapters \['nope'\].*\['default'\]"):
        model.save_pretrained(tmp_path, selected_adapters=["nope"])


@pytest.mark.parametrize("line, match", [
    ("lora: {target_modules: 5}", "lora.target_modules must be a list of module names"),
    ("train: {device: gpu}", "train.device 'gpu' is not a device"),
    ("train: {seed: abc}", "train.seed must be an integer"),
    ("train: {weight_decay: -0.1}", "train.weight_decay must be >= 0"),
    ("train: {max_grad_norm: high}", "train.max_grad_norm must be a number"),
    ("train: {save_every: 2.5}", "train.save_every must be an integer"),
    ("data: {train: t.jsonl, eval_fraction: x}", "data.eval_fraction must be a number"),
    ("lora: {r: 0}", "lora.r must be a positive integer"),
    ("lora: {dropout: 1.5}", "lora.dropout must be in"),
])
def test_every_config_key_is_checked_when_read_with_its_line(line, match, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\n" + ("data: {train: t.jsonl}\n" if not line.startswith("data") else "") + line + "\n")
    with pytest.raises(LorakitError, match=rf"run.yaml:\d+: {match}"):
        load_run(path)


def test_a_trained_model_gives_the_logits_of_its_file(tiny_model_dir, data_file, tmp_path):
    """The end of the DoRA story through the trainer: its fused AdamW, then the adapter file in PEFT."""
    import peft
    from transformers import AutoModelForCausalLM
    model, tokenizer = lorakit.load_model(str(tiny_model_dir))
    cfg = run_config(tiny_model_dir, data_file, tmp_path, "lora.variant=dora", "train.max_steps=8")
    train(cfg, model=model, tokenizer=tokenizer, progress=False)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path).eval()
    torch.testing.assert_close(logits(model.eval(), ids), logits(theirs, ids), atol=1e-5, rtol=0)
