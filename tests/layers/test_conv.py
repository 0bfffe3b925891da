"""LoRA on nn.Conv1d / Conv2d / Conv3d (grouped too): PEFT's weights, outputs, merges and files."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit

warnings.filterwarnings("ignore")


class Net(nn.Module):
    def __init__(self, dims: int, groups: int = 1, kernel: int = 3):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        torch.manual_seed(0)
        self.conv = conv(4, 8, kernel, stride=2 if kernel > 1 else 1, padding=1 if kernel > 1 else 0, groups=groups)
        self.head = conv(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


CASES = [(1, 1, 3), (2, 1, 3), (3, 1, 3), (2, 1, 1), (2, 2, 3), (1, 4, 3)]


def _input(dims):
    torch.manual_seed(5)
    return torch.randn(2, 4, *([6] * dims))


def _pair(dims, groups, kernel, **kw):
    full = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["conv", "head"], **kw)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(Net(dims, groups, kernel), peft.LoraConfig(**copy.deepcopy(full)))
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(Net(dims, groups, kernel), lorakit.LoraConfig(**full))
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("dims,groups,kernel", CASES)
def test_same_seed_same_weights_same_outputs(dims, groups, kernel):
    theirs, ours = _pair(dims, groups, kernel)
    t, o = peft.get_peft_model_state_dict(theirs), lorakit.get_peft_model_state_dict(ours)
    assert sorted(t) == sorted(o)
    for k in t:
        assert torch.equal(t[k], o[k]), k
    x = _input(dims)
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dims,kernel", [(1, 3), (2, 3), (3, 3), (2, 1)])
def test_merge_unmerge_and_merged_weights_equal_peft(dims, kernel):
    theirs, ours = _pair(dims, 1, kernel)
    x = _input(dims)
    with torch.no_grad():
        before = ours(x)
        ours.merge_adapter()
        theirs.base_model.model.conv.merge()  # PEFT 0.21 cannot merge a 1x1x1 Conv3d (the head); lorakit can
        assert torch.allclose(ours(x), before, atol=1e-5)
        w_ours = ours.base_model.model.conv.base_layer.weight
        assert torch.allclose(w_ours, theirs.base_model.model.conv.base_layer.weight, atol=1e-6)
        ours.unmerge_adapter()
        assert torch.allclose(ours.base_model.model.conv.base_layer.weight, Net(dims, 1, kernel).conv.weight,
                              atol=1e-6)
        assert torch.allclose(ours(x), before, atol=1e-6)


def test_grouped_conv_merge_is_refused_and_groups_must_divide_r():
    _, ours = _pair(2, 2, 3)
    with pytest.raises(lorakit.LorakitError, match="grouped convolution"):
        ours.merge_adapter()
    with pytest.raises(lorakit.LorakitError, match="must divide r"):
        lorakit.get_peft_model(Net(2, 4), lorakit.LoraConfig(r=6, target_modules=["conv"]))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_files_load_both_ways(dims, tmp_path):
    theirs, ours = _pair(dims, 1, 3)
    x = _input(dims)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(Net(dims), tmp_path / "ours").eval()
    in_lorakit = lorakit.PeftModel.from_pretrained(Net(dims), tmp_path / "theirs")
    with torch.no_grad():
        assert torch.allclose(in_peft(x), theirs(x), atol=1e-5, rtol=0)
        assert torch.allclose(in_lorakit(x), theirs(x), atol=1e-5, rtol=0)


def test_conv_adapter_trains():
    _, ours = _pair(2, 1, 3)
    ours.train()
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    x, target = _input(2), torch.zeros(2, 4, 3, 3)
    losses = []
    for _ in range(20):
        loss = ((ours(x) - target) ** 2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(not p.requires_grad for n, p in ours.named_parameters() if "lora_" not in n)
