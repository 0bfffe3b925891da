"""PEFT's lora_bias=True (a bias on B): same init RNG, outputs, merges and files as PEFT."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit

warnings.filterwarnings("ignore")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.lin = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        return self.lin(torch.relu(self.conv(x)).flatten(1))


def _pair(init=False):
    kw = dict(r=2, lora_alpha=4, init_lora_weights=init, lora_bias=True, target_modules=["conv", "lin"])
    torch.manual_seed(1)
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(**copy.deepcopy(kw)))
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(Net(), lorakit.LoraConfig(**kw))
    return theirs.eval(), ours.eval()


X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("init", [False, True])
def test_same_weights_and_outputs_as_peft(init):
    theirs, ours = _pair(init)
    t, o = peft.get_peft_model_state_dict(theirs), lorakit.get_peft_model_state_dict(ours)
    assert sorted(t) == sorted(o) and "base_model.model.lin.lora_B.bias" in o
    for k in t:
        assert torch.equal(t[k], o[k]), k
    with torch.no_grad():
        assert torch.allclose(ours(X), theirs(X), atol=1e-5, rtol=0)


def test_merge_unmerge_folds_the_bias():
    theirs, ours = _pair()
    with torch.no_grad():
        before = ours(X)
        ours.merge_adapter(), theirs.merge_adapter()
        assert torch.allclose(ours(X), before, atol=1e-5)
        for name in ("conv", "lin"):
            mine, peft_layer = getattr(ours.base_model.model, name), getattr(theirs.base_model.model, name)
            assert torch.allclose(mine.base_layer.bias, peft_layer.base_layer.bias, atol=1e-6)
        ours.unmerge_adapter()
        assert torch.allclose(ours.base_model.model.lin.base_layer.bias, Net().lin.bias, atol=1e-6)
        assert torch.allclose(ours(X), before, atol=1e-6)


def test_files_both_ways(tmp_path):
    theirs, ours = _pair()
    ours.save_pretrained(tmp_path / "ours"), theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        assert torch.allclose(peft.PeftModel.from_pretrained(Net(), tmp_path / "ours").eval()(X), theirs(X), atol=1e-5)
        assert torch.allclose(lorakit.PeftModel.from_pretrained(Net(), tmp_path / "theirs")(X), theirs(X), atol=1e-5)


def test_lora_bias_trains_and_is_refused_where_it_cannot_work():
    _, ours = _pair()
    ours.train()
    loss = ours(X).square().mean()
    loss.backward()
    assert ours.base_model.model.lin.lora_bias["default"].grad is not None
    emb = nn.Sequential(nn.Embedding(5, 4))
    with pytest.raises(lorakit.LorakitError, match="lora_bias=True is not supported"):
        lorakit.get_peft_model(emb, lorakit.LoraConfig(target_modules=["0"], lora_bias=True))
    nobias = nn.Sequential(nn.Linear(4, 4, bias=False))
    with pytest.warns(UserWarning, match="`lora_bias=True` was passed but the targeted layer of type Linear has no"):
        model = lorakit.get_peft_model(nobias, lorakit.LoraConfig(target_modules=["0"], lora_bias=True))
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True` because the base") as e:
        model.merge_adapter(safe_merge=True)
    assert isinstance(e.value, lorakit.LorakitError)  # still lorakit's error (a ValueError) too
    assert model.base_model.model[0].merged_adapters == []
