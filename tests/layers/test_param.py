"""LoRA on an nn.Parameter (target_parameters, layers/param.py): PEFT's weights, outputs, gradients, merges, files."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit

warnings.filterwarnings("ignore")


class ParamLinear(nn.Module):
    """A linear layer written by hand: its weight is (in, out), used as x @ W (not a kind lorakit knows)."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.ones(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0 = ParamLinear(10, 20)
        self.lin1 = nn.Linear(20, 2)
        self.lin2 = nn.Linear(2, 2)

    def forward(self, x):
        return self.lin2(self.lin1(torch.relu(self.lin0(x))))


CASES = [{"target_parameters": ["lin0.weight"]},
         {"target_modules": ["lin2"], "target_parameters": ["lin0.weight", "lin1.weight"]}]


def _pair(kw):
    full = dict(r=4, lora_alpha=8, init_lora_weights=False, **kw)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(**copy.deepcopy(full)))
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**full))
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("kw", CASES, ids=["param-only", "modules-and-params"])
def test_same_seed_same_weights_outputs_and_gradients(kw):
    theirs, ours = _pair(kw)
    t, o = peft.get_peft_model_state_dict(theirs), lorakit.get_peft_model_state_dict(ours)
    assert sorted(t) == sorted(o) and "base_model.model.lin0.lora_A.weight" in o
    for k in t:
        assert torch.equal(t[k], o[k]), k
    x = torch.randn(5, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    theirs.train(), ours.train()
    theirs(x).pow(2).sum().backward(), ours(x).pow(2).sum().backward()
    g_t = {n.replace(".weight", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    g_o = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert sorted(g_t) == sorted(g_o)
    for n in g_t:
        torch.testing.assert_close(g_o[n], g_t[n], atol=1e-5, rtol=1e-5)
    assert ours.base_model.model.lin0.base_layer.weight.grad is None  # the base parameter stays frozen


@pytest.mark.parametrize("kw", CASES, ids=["param-only", "modules-and-params"])
def test_merge_unmerge_unload_and_files_both_ways(kw, tmp_path):
    theirs, ours = _pair(kw)
    x = torch.randn(5, 10)
    with torch.no_grad():
        before = ours(x)
        ours.merge_adapter()
        torch.testing.assert_close(ours(x), before, atol=1e-5, rtol=0)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours.base_model.model.lin0.base_layer.weight, Net().lin0.weight, atol=1e-6, rtol=0)
        with ours.disable_adapter():
            torch.testing.assert_close(ours(x), Net()(x), atol=1e-6, rtol=0)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(Net(), tmp_path / "ours").eval()
    in_lorakit = lorakit.PeftModel.from_pretrained(Net(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(in_peft(x), before, atol=1e-5, rtol=0)
        torch.testing.assert_close(in_lorakit(x), before, atol=1e-5, rtol=0)
    merged = ours.merge_and_unload()
    assert type(merged.lin0) is ParamLinear
    with torch.no_grad():
        torch.testing.assert_close(merged(x), before, atol=1e-5, rtol=0)


def test_what_peft_refuses_is_refused():
    for bad in (dict(lora_dropout=0.1), dict(use_dora=True), dict(lora_bias=True)):
        with pytest.raises(lorakit.LorakitError, match="target_parameters"):
            lorakit.LoraConfig(target_parameters=["lin0.weight"], **bad)
    with pytest.raises(lorakit.LorakitError, match="matches no parameter"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_parameters=["lin9.weight"]))
    with pytest.raises(lorakit.LorakitError, match="adapted already"):
        lorakit.get_peft_model(Net(), lorakit.LoraConfig(target_modules=["lin1"], target_parameters=["lin1.weight"]))
    experts = nn.Module()
    experts.w = nn.Parameter(torch.randn(3, 4, 5))
    with pytest.raises(lorakit.LorakitError, match="2-D parameters only"):
        lorakit.get_peft_model(nn.ModuleDict({"e": experts}), lorakit.LoraConfig(target_parameters=["e.w"]))
    _, ours = _pair(CASES[0])
    with pytest.raises(lorakit.LorakitError, match="mixed adapter batches"):
        ours(torch.randn(5, 10), adapter_names=["default"] * 5)
