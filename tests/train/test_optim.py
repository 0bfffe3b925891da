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
