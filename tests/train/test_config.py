"""Run configs: defaults < file < --set, named runs, and errors with file:line and a suggestion."""

import pytest

from lorakit import LorakitError, VeloraConfig
from lorakit.train.config import load_run, lora_config

ONE = """\
model: my-model
data:
  train: train.jsonl
lora:
  r: 8
  target_modules: [q_proj, v_proj]
train:
  max_steps: 10
  learning_rate: 1.0e-3
output_dir: out
"""

MANY = """\
defaults:
  model: base-model
  data: {train: t.jsonl}
  train: {batch_size: 4, learning_rate: 1.0e-4}
runs:
  small:
    lora: {r: 4}
  big:
    lora: {r: 64, variant: dora}
    train: {learning_rate: 5.0e-5}
"""


def _write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_precedence_defaults_file_command_line(tmp_path):
    cfg = load_run(_write(tmp_path, ONE), overrides=["train.max_steps=99", "lora.dropout=0.1",
                                                     "train.learning_rate=2e-3"])
    assert cfg.model == "my-model" and cfg.lora.r == 8  # file
    assert cfg.train.max_steps == 99 and cfg.lora.dropout == 0.1  # command line wins
    assert cfg.train.batch_size == 8 and cfg.lora.alpha == 32  # defaults
    assert cfg.train.learning_rate == 2e-3  # 2e-3 is a float, not YAML 1.1's string


def test_named_runs_share_defaults(tmp_path):
    path = _write(tmp_path, MANY)
    small, big = load_run(path, run="small"), load_run(path, run="big")
    assert (small.lora.r, small.train.batch_size, small.train.learning_rate) == (4, 4, 1e-4)
    assert (big.lora.r, big.lora.variant, big.train.learning_rate, big.model) == (64, "dora", 5e-5, "base-model")
    assert big.name == "big"
    with pytest.raises(LorakitError, match="did you mean 'small'"):
        load_run(path, run="smal")
    with pytest.raises(LorakitError, match="pick one with --run"):
        load_run(path)


def test_unknown_keys_name_file_line_and_suggestion(tmp_path):
    text = ONE.replace("  r: 8", "  rank: 8").replace("  max_steps: 10", "  max_step: 10")
    with pytest.raises(LorakitError) as e:
        load_run(_write(tmp_path, text))
    msg = str(e.value)
    assert "run.yaml:5: unknown key 'lora.rank'; did you mean 'lora.r'?" in msg
    assert "run.yaml:8: unknown key 'train.max_step'; did you mean 'train.max_steps'?" in msg


def test_bad_values_and_yaml(tmp_path):
    with pytest.raises(LorakitError) as e:
        load_run(_write(tmp_path, ONE), overrides=["lora.variant=lokr", "train.batch_size=0"])
    assert "lora.variant must be one of" in str(e.value) and "train.batch_size must be an integer >= 1" in str(e.value)
    with pytest.raises(LorakitError, match=r"run.yaml:3: not valid YAML"):
        load_run(_write(tmp_path, "model: x\ndata:\n  train: a: b\n"))
    with pytest.raises(LorakitError, match="expected section.key=value"):
        load_run(_write(tmp_path, ONE), overrides=["train.max_steps"])
    with pytest.raises(LorakitError, match="not found"):
        load_run(tmp_path / "missing.yaml")


def test_lora_section_maps_to_peft_names(tmp_path):
    cfg = load_run(_write(tmp_path, ONE), overrides=["lora.variant=dora", "lora.rslora=true"])
    lc = lora_config(cfg)
    assert (lc.r, lc.lora_alpha, lc.use_dora, lc.use_rslora, lc.target_modules) == (8, 32, True, True, ["q_proj", "v_proj"])
    assert lora_config(load_run(_write(tmp_path, ONE), overrides=["lora.variant=lora_fa"])).lora_fa
    velora = lora_config(load_run(_write(tmp_path, ONE), overrides=["lora.variant=velora"]))
    assert velora.velora_config == VeloraConfig() and not velora.use_dora and lc.velora_config is None
