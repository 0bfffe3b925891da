"""Optimizers for adapters (train/optim.py): LoRA+ parameter groups."""

import lorakit
from lorakit import LoraConfig
from conftest import tiny_llama


def test_lora_plus_groups():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    opt = lorakit.lora_plus_optimizer(model, lr=1e-4, ratio=16)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"A": 1e-4, "B": 1.6e-3}
    n_b = sum(p.numel() for g in opt.param_groups if g["name"] == "B" for p in g["params"])
    assert n_b == sum(l.lora_B["default"].numel() for _, l in lorakit.lora_layers(model))


# -- train.optimizer -------------------------------------------------------------------------------

import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import loop, train
from lorakit.train.optim import OPTIMIZERS, build_optimizer, state_bytes
from conftest import run_config


def _regression(kind: str) -> tuple[list[float], torch.optim.Optimizer]:
    """A LoRA on a 64 -> 1024 linear layer (A and B hold 8192 elements: 8-bit state applies) fitting a target."""
    torch.manual_seed(0)
    model = lorakit.add_adapter(torch.nn.Sequential(torch.nn.Linear(1024, 64)),
                                LoraConfig(r=8, target_modules=["0"], init_lora_weights="gaussian"))
    x, target = torch.randn(32, 1024), torch.randn(32, 64)
    opt = build_optimizer(model, 1e-2, kind=kind)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, opt


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_each_optimizer_is_what_it_says_and_learns(kind):
    losses, opt = _regression(kind)
    assert losses[-1] < losses[0] * 0.9, losses
    state = next(iter(opt.state.values()))
    expected = {"adamw": ("exp_avg", torch.float32), "adamw_8bit": ("state1", torch.uint8),
                "paged_adamw_8bit": ("state1", torch.uint8), "adafactor": ("exp_avg_sq_row", torch.float32),
                "sgd": ("momentum_buffer", torch.float32)}[kind]
    assert state[expected[0]].dtype == expected[1], sorted(state)
    if kind == "adafactor":  # factored: a row and a column, not a full second moment
        assert state["exp_avg_sq_row"].numel() + state["exp_avg_sq_col"].numel() in (64 + 8, 8 + 1024)


def test_eight_bit_state_is_a_quarter_of_adamw():
    sizes = {kind: state_bytes(_regression(kind)[1]) for kind in ("adamw", "adamw_8bit", "sgd")}
    # A (8192 elements) at 1 byte a moment, B (512, under bitsandbytes' 4096 minimum) at 4: 22.8 of 69.6 kB
    assert sizes["adamw_8bit"] < 0.35 * sizes["adamw"] and sizes["sgd"] < 0.6 * sizes["adamw"], sizes


def test_unknown_optimizer_is_a_config_error(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(lorakit.LorakitError, match="train.optimizer must be one of adamw, adamw_8bit"):
        run_config(tiny_model_dir, data_file, tmp_path, "train.optimizer=adam8")


def _sigterm_during(monkeypatch, micro_step):
    real, calls = loop.accumulate, {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == micro_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, "accumulate", wrapped)


@pytest.mark.parametrize("kind", OPTIMIZERS)
def test_resume_restores_each_optimizer_exactly(kind, tiny_model_dir, data_file, tmp_path, monkeypatch):
    """Interrupted at step 2 and resumed = trained straight, bit for bit (r=128: 8-bit state applies)."""
    extra = ["train.max_steps=4", f"train.optimizer={kind}", "lora.r=128", "lora.target_modules=[q_proj]"]
    straight = train(run_config(tiny_model_dir, data_file, tmp_path / "a", *extra), progress=False)
    _sigterm_during(monkeypatch, 2)
    assert train(run_config(tiny_model_dir, data_file, tmp_path / "b", *extra), progress=False).steps == 2
    saved = torch.load(tmp_path / "b/checkpoints/step-000002/optimizer.pt", weights_only=True)
    if "8bit" in kind:
        packed = [s.get("__bnb_optimizer_quant_state__", s) for s in saved["state"].values()]
        assert any(s["state1"].dtype == torch.uint8 for s in packed), packed
    monkeypatch.undo()
    resumed = train(run_config(tiny_model_dir, data_file, tmp_path / "b", *extra), resume=True, progress=False)
    assert resumed.steps == straight.steps == 4
    a, b = (load_file(tmp_path / f"{x}/adapter_model.safetensors") for x in "ab")
    for k in a:
        assert torch.equal(a[k], b[k]), k
