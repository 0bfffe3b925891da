"""DoRA (layers/dora.py): its cached weight norm never outlives the weights it was computed from.

The norm ||W0 + s·BA|| per row is cached only for frozen adapters (see the module doc): optimizers may
update parameters without bumping their version counters (torch's fused AdamW and bitsandbytes' 8-bit
AdamW do not; a user's own optimizer writing through .data does not either), so a version-keyed cache
would keep the step-1 norm through training. The trained model must give the logits of the same
adapter reloaded from disk, in lorakit and in PEFT.
"""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from conftest import logits, model_with_adapter, tiny_llama

_model_with_adapter = model_with_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]


class _OwnSGD:
    """A user's own optimizer: writes through .data (no version counter moves)."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def step(self):
        for p in self.params:
            p.data.add_(p.grad, alpha=-self.lr)

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _optimizer(kind, params):
    params = list(params)
    if kind == "adamw_8bit":
        bnb = pytest.importorskip("bitsandbytes")
        return bnb.optim.AdamW8bit(params, lr=0.05, min_8bit_size=0)
    if kind == "own":
        return _OwnSGD(params, lr=0.5)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    return torch.optim.AdamW(params, lr=0.05, fused=kind == "adamw_fused", foreach=kind == "adamw_foreach")


def _train(model, ids, kind, steps=6):
    opt = _optimizer(kind, (p for p in model.parameters() if p.requires_grad))
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()


@pytest.mark.parametrize("kind", ["adamw_fused", "adamw_foreach", "adamw_8bit", "sgd", "own"])
def test_trained_dora_model_equals_its_adapter_reloaded(kind, tmp_path, ids):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    with torch.no_grad():
        model(input_ids=ids)  # an eval forward before training: a cache could be filled here
    _train(model, ids, kind)
    ours = logits(model, ids)
    lorakit.save_adapter(model, tmp_path)
    reloaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(ours, logits(reloaded, ids), atol=1e-5, rtol=0)
    import peft
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(ours, logits(theirs, ids), atol=1e-5, rtol=0)


def test_frozen_dora_adapter_reuses_its_norm_until_the_weights_change(tmp_path, ids):
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True, init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path)
    frozen = lorakit.load_adapter(tiny_llama(), tmp_path)  # is_trainable=False: nothing trains it
    layer = frozen.model.layers[0].self_attn.q_proj
    first = logits(frozen, ids)
    cached = layer.variants["default"]._norm
    assert cached is not None
    torch.testing.assert_close(logits(frozen, ids), first, atol=0, rtol=0)
    assert layer.variants["default"]._norm is cached  # the decode-time saving: no norm recomputed
    with torch.no_grad():
        layer.lora_B["default"].mul_(3.0)  # an in-place change moves the version counter
    changed = logits(frozen, ids)
    assert layer.variants["default"]._norm is not cached
    lorakit.save_adapter(frozen, tmp_path / "changed")
    torch.testing.assert_close(changed, logits(lorakit.load_adapter(tiny_llama(), tmp_path / "changed"), ids),
                               atol=1e-5, rtol=0)


def test_dora_weight_norm_cache_tracks_updates(ids):
    """The DoRA norm is cached between forwards, but a weight update must invalidate it."""
    model = _model_with_adapter("llama", use_dora=True)
    with torch.no_grad():
        out1 = logits(model, ids)
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].add_(0.05)
        out2 = logits(model, ids)
    # recompute from scratch in a fresh model with the same weights
    fresh = _model_with_adapter("llama", use_dora=True)
    fresh.load_state_dict(model.state_dict())
    assert not torch.allclose(out1, out2)
    assert torch.allclose(logits(fresh, ids), out2, atol=1e-6, rtol=0)
