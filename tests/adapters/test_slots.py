"""Fast attach / detach for servers: the same numbers as load_adapter, the checked path when it must."""

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.adapters import files, slots

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved(tmp_path, name, seed, targets=TARGETS, r=4):
    model = tiny_llama()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights=False),
                        name)
    torch.manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    lorakit.save_adapter(model, tmp_path / name, name)
    return tmp_path / name


def test_fast_attach_equals_load_adapter_and_detach_keeps_layers(tmp_path, monkeypatch, ids):
    first, second = saved(tmp_path, "first", 1), saved(tmp_path, "second", 2, r=8)
    ref = tiny_llama()
    lorakit.load_adapter(ref, second, "x")
    model = tiny_llama()
    slots.attach(model, *files.read_adapter(first), "s1", first)  # nothing wrapped yet: the checked path
    calls = []
    monkeypatch.setattr(files, "attach_adapter", lambda *a, **k: calls.append(a))
    slots.attach(model, *files.read_adapter(second), "s2", second)
    assert not calls  # the fast path
    with torch.no_grad(), lorakit.adapter_rows(model, ["s2", "s2"]):
        got = model(ids).logits
    torch.testing.assert_close(got, ref(ids).logits, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".s2" in n)
    slots.detach(model, "s1")
    slots.detach(model, "s2")
    assert not any(".s1" in n or ".s2" in n for n, _ in model.named_parameters())
    assert lorakit.adapters.manage.configs(model) == {}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits)  # wrapped, but only the base


def test_a_new_target_or_a_bad_file_takes_the_checked_path(tmp_path):
    attn = saved(tmp_path, "attn", 1, targets=["q_proj", "v_proj"])
    mlp = saved(tmp_path, "mlp", 2, targets=["gate_proj"])
    model = tiny_llama()
    slots.attach(model, *files.read_adapter(attn), "s1", attn)
    slots.attach(model, *files.read_adapter(mlp), "s2", mlp)  # gate_proj not wrapped yet: wrapped now
    assert "s2" in model.model.layers[0].mlp.gate_proj.r
    config, tensors = files.read_adapter(attn)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(3, 3)
    with pytest.raises(lorakit.LorakitError, match="shape"):
        slots.attach(model, config, tensors, "s3", attn)
    assert "s3" not in lorakit.adapters.manage.configs(model)
