"""DoRA on nn.Conv1d/2d/3d (grouped too) and nn.Embedding: PEFT's magnitudes, outputs, gradients, merges, files."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit

warnings.filterwarnings("ignore")


class ConvNet(nn.Module):
    def __init__(self, dims: int = 2, groups: int = 1, kernel: int = 3):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        torch.manual_seed(0)
        self.conv = conv(4, 8, kernel, stride=2 if kernel > 1 else 1, padding=1 if kernel > 1 else 0, groups=groups)
        self.head = conv(8, 4, 1, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))


class EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 6, padding_idx=0)
        self.lin = nn.Linear(6, 3)

    def forward(self, x):
        return self.lin(self.emb(x))


def _input(net):
    torch.manual_seed(5)
    if isinstance(net, EmbNet):
        return torch.randint(0, 12, (3, 7))
    return torch.randn(2, 4, *([6] * (net.conv.weight.dim() - 2)))


def _pair(make, targets, **kw):
    full = dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True, target_modules=targets, **kw)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**copy.deepcopy(full)))
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(make(), lorakit.LoraConfig(**full))
    return theirs.eval(), ours.eval()


CASES = [(lambda: ConvNet(1), ["conv", "head"]), (lambda: ConvNet(2), ["conv", "head"]),
         (lambda: ConvNet(3), ["conv"]), (lambda: ConvNet(2, kernel=1), ["conv", "head"]),
         (lambda: ConvNet(2, groups=2), ["conv"]), (lambda: ConvNet(1, groups=4), ["conv"]),
         (EmbNet, ["emb", "lin"])]
IDS = ["conv1d", "conv2d", "conv3d", "conv2d-1x1", "conv2d-groups2", "conv1d-groups4", "embedding"]


@pytest.mark.parametrize("make,targets", CASES, ids=IDS)
def test_same_seed_same_magnitudes_same_outputs(make, targets):
    theirs, ours = _pair(make, targets)
    t, o = peft.get_peft_model_state_dict(theirs), lorakit.get_peft_model_state_dict(ours)
    assert sorted(t) == sorted(o) and any("lora_magnitude_vector" in k for k in t)
    for k in t:
        assert t[k].shape == o[k].shape, k
        torch.testing.assert_close(o[k], t[k], atol=1e-6, rtol=0)
    x = _input(make())
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make,targets", CASES[:2] + CASES[-1:], ids=["conv1d", "conv2d", "embedding"])
def test_training_forward_and_gradients_equal_peft(make, targets):
    """Train mode with dropout: the base sees the dropped-out input too; same masks from the same seed."""
    theirs, ours = _pair(make, targets, lora_dropout=0.3)
    theirs.train(), ours.train()
    x = _input(make())
    torch.manual_seed(7)
    out_t = theirs(x)
    torch.manual_seed(7)
    out_o = ours(x)
    torch.testing.assert_close(out_o, out_t, atol=1e-5, rtol=0)
    out_t.pow(2).sum().backward(), out_o.pow(2).sum().backward()
    grads_t = {n: p.grad for n, p in theirs.named_parameters() if "lora_magnitude" in n}
    grads_o = {n: p.grad for n, p in ours.named_parameters() if "lora_magnitude" in n}
    assert len(grads_t) == len(grads_o) > 0
    for (nt, gt), (no, go) in zip(sorted(grads_t.items()), sorted(grads_o.items())):
        assert go is not None and gt.shape == go.shape, (nt, no)
        torch.testing.assert_close(go, gt, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make,targets", [CASES[0], CASES[1], CASES[2], CASES[3], CASES[-1]],
                         ids=["conv1d", "conv2d", "conv3d", "conv2d-1x1", "embedding"])
def test_merge_unmerge_equal_peft(make, targets):
    theirs, ours = _pair(make, targets)
    x = _input(make())
    module = targets[0]
    with torch.no_grad():
        before = ours(x)
        ours.merge_adapter()
        getattr(theirs.base_model.model, module).merge()
        merged_o = getattr(ours.base_model.model, module).base_layer.weight
        merged_t = getattr(theirs.base_model.model, module).base_layer.weight
        torch.testing.assert_close(merged_o, merged_t, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(x), before, atol=1e-5, rtol=0)
        ours.unmerge_adapter()
        original = getattr(make(), module).weight
        torch.testing.assert_close(getattr(ours.base_model.model, module).base_layer.weight, original,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(ours(x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make,targets", [(lambda: ConvNet(2), ["conv"]), (EmbNet, ["emb", "lin"])],
                         ids=["conv2d", "embedding"])
def test_merging_several_dora_and_plain_adapters_equals_their_forward(make, targets):
    """Each DoRA norm is that of the unmerged weight (what forward sees), as in PEFT 0.21."""
    full = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets)
    models = []
    for lib in (peft, lorakit):
        torch.manual_seed(1)
        model = lib.get_peft_model(make(), lib.LoraConfig(**full, use_dora=True))
        for i, dora in enumerate([False, True]):
            torch.manual_seed(2 + i)
            model.add_adapter(f"a{i}", lib.LoraConfig(**full, use_dora=dora))
        model.base_model.set_adapter(["default", "a0", "a1"])
        models.append(model.eval())
    theirs, ours = models
    x = _input(make())
    with torch.no_grad():
        before = ours(x)
        torch.testing.assert_close(before, theirs(x), atol=1e-5, rtol=0)
        ours.merge_adapter(), theirs.merge_adapter()
        torch.testing.assert_close(ours(x), before, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(x), before, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make,targets", [CASES[1], CASES[4], CASES[-1]], ids=["conv2d", "conv2d-groups2", "embedding"])
def test_files_load_both_ways(make, targets, tmp_path):
    theirs, ours = _pair(make, targets)
    x = _input(make())
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    in_peft = peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()
    in_lorakit = lorakit.PeftModel.from_pretrained(make(), tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(in_peft(x), theirs(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(in_lorakit(x), theirs(x), atol=1e-5, rtol=0)


def test_conv_and_embedding_dora_train():
    for make, targets in (CASES[1], CASES[-1]):
        _, ours = _pair(make, targets)
        ours.train()
        x = _input(make())
        target = torch.zeros_like(ours(x))
        opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.05)
        losses = []
        for _ in range(20):
            loss = ((ours(x) - target) ** 2).mean()
            opt.zero_grad(), loss.backward(), opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.7 * losses[0], (targets, losses)


def test_mixed_adapter_batch_with_a_dora_embedding_is_refused():
    _, ours = _pair(EmbNet, ["emb"])
    with pytest.raises(lorakit.LorakitError, match="DoRA"):
        ours(_input(EmbNet()), adapter_names=["default"] * 3)
