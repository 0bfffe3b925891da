"""LoRA on nn.MultiheadAttention (layers/mha.py): PEFT's weights and keys, the correct adapted attention.

PEFT 0.21.2 adds out_proj's delta twice in its MHA forward and merge (huggingface/peft#3774); lorakit adds
it once. So outputs are compared with a plain nn.MultiheadAttention whose weights were set to W + ΔW by
hand, and with PEFT where out_proj's B is zero (there the double add does not show).
"""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit

warnings.filterwarnings("ignore")


class Net(nn.Module):
    def __init__(self, batch_first: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = nn.Linear(10, 10)
        self.mha = nn.MultiheadAttention(10, 2, batch_first=batch_first)
        self.lin1 = nn.Linear(10, 2)

    def forward(self, x):
        x = self.lin0(x)
        x, _ = self.mha(x, x, x)
        return self.lin1(x)


FULL = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["mha", "lin0"])


def _pair(adapters=("default", "b")):
    models = []
    for lib in (peft, lorakit):
        torch.manual_seed(1)
        model = lib.get_peft_model(Net(), lib.LoraConfig(**copy.deepcopy(FULL)))
        for i, name in enumerate(adapters[1:]):
            torch.manual_seed(2 + i)
            model.add_adapter(name, lib.LoraConfig(**copy.deepcopy(FULL)))
        models.append(model.eval())
    return models


def _reference(ours, name="default"):
    """A plain Net with every targeted weight set to W + ΔW of adapter `name`."""
    ref, mods = Net(), ours.base_model.model
    with torch.no_grad():
        ref.lin0.weight += mods.lin0.delta_weight(name)
        ref.mha.in_proj_weight += mods.mha.delta_weight(name)
        ref.mha.out_proj.weight += mods.mha.base_layer.out_proj.delta_weight(name)
    return ref.eval()


def test_same_seed_same_weights_and_keys_as_peft():
    theirs, ours = _pair()
    for name in ("default", "b"):
        t = peft.get_peft_model_state_dict(theirs, adapter_name=name)
        o = lorakit.get_peft_model_state_dict(ours, adapter_name=name)
        assert sorted(t) == sorted(o) and "base_model.model.mha.base_layer.out_proj.lora_A.weight" in o
        for k in t:
            assert torch.equal(t[k], o[k]), k


def test_forward_merge_unmerge_equal_the_attention_with_adapted_weights():
    _, ours = _pair()
    x = torch.randn(6, 3, 10)
    ref = _reference(ours)
    base_in = Net().mha.in_proj_weight
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours.base_model.model.mha.base_layer.in_proj_weight, base_in, atol=1e-6, rtol=0)
        with ours.disable_adapter():
            torch.testing.assert_close(ours(x), Net().eval()(x), atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    assert type(merged.mha) is nn.MultiheadAttention and type(merged.mha.out_proj) is not lorakit.LoraLayer
    torch.testing.assert_close(merged(x), ref(x), atol=1e-5, rtol=0)


def test_equals_peft_where_peft_adds_out_proj_once():
    theirs, ours = _pair()
    with torch.no_grad():
        ours.base_model.model.mha.base_layer.out_proj.lora_B["default"].zero_()
        theirs.base_model.model.mha.base_layer.out_proj.lora_B["default"].weight.zero_()
    x = torch.randn(6, 3, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    ours.train(), theirs.train()
    ours(x).pow(2).sum().backward(), theirs(x).pow(2).sum().backward()
    for key in ("lin0.lora_A", "mha.lora_A", "mha.lora_B"):
        g_t = dict(theirs.named_parameters())[f"base_model.model.{key}.default.weight"].grad
        g_o = dict(ours.named_parameters())[f"base_model.model.{key}.default"].grad
        torch.testing.assert_close(g_o, g_t, atol=1e-5, rtol=1e-5)


def test_adapters_switch_and_files_load_both_ways(tmp_path):
    theirs, ours = _pair()
    x = torch.randn(6, 3, 10)
    ours.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), _reference(ours, "b")(x), atol=1e-5, rtol=0)
    ours.set_adapter("default")
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours").eval()
    in_lorakit = lorakit.PeftModel.from_pretrained(Net(), tmp_path / "theirs")
    for a, b in zip(sorted(peft.get_peft_model_state_dict(in_peft).items()),
                    sorted(lorakit.get_peft_model_state_dict(ours).items())):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    with torch.no_grad():
        torch.testing.assert_close(in_lorakit(x), _reference(ours)(x), atol=1e-5, rtol=0)
    ours.delete_adapter("b")
    assert "b" not in ours.base_model.model.mha.base_layer.out_proj.lora_A


def test_trains_and_refuses_what_peft_refuses():
    _, ours = _pair(("default",))
    ours.train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
    x, target = torch.randn(6, 3, 10), torch.zeros(6, 3, 2)
    losses = []
    for _ in range(15):
        loss = ((ours(x) - target) ** 2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
    with pytest.raises(lorakit.LorakitError, match="DoRA"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_modules=["mha"], use_dora=True))
    with pytest.raises(lorakit.LorakitError, match="same size"):
        lorakit.get_peft_model(nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)),
                               lorakit.LoraConfig(target_modules=["0"]))
    ours.eval()
    with pytest.raises(lorakit.LorakitError, match="mixed adapter batches"):
        ours(x, adapter_names=["default"] * 6)
