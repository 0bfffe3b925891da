"""Rebuilt activations (layers/recompute.py): what backward can recompute from what the graph keeps is
stored as a recipe, with bit-identical gradients."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from conftest import MODELS, model_with_adapter, tiny_llama

_model_with_adapter = model_with_adapter


def test_recompute_plan_follows_the_product_rule():
    from lorakit.layers import recompute
    h = torch.randn(3, 4, requires_grad=True)
    w, leaf = torch.randn(4), torch.randn(3, 4, requires_grad=True)
    r = torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6)
    x = w * (h * r)  # RMSNorm: w kept, h·r not kept but itself a product of kept h and r
    assert recompute.plan(x) is x.grad_fn
    assert torch.equal(recompute.replay(recompute.plan(x)), x)
    assert recompute.plan(leaf * w) is None  # the leaf is not kept (w needs no grad): nothing to rebuild from
    assert recompute.plan((h * r).clone()) is None  # not a product's direct output
    assert recompute.plan(w * 2.0) is None  # no graph
    F = torch.nn.functional
    for act in (F.silu, F.gelu, lambda t: F.gelu(t, approximate="tanh")):
        y = act(h)  # an activation keeps its input
        assert torch.equal(recompute.replay(recompute.plan(y)), y)
    y = torch.nn.functional.silu(h) * (h * r)  # SwiGLU-like: both factors kept
    assert torch.equal(recompute.replay(recompute.plan(y)), y)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert recompute.plan(w * (h * r)) is None  # checkpointing-style hooks: keep x


def _assert_rebuilt_activations_change_nothing(model, forward, autocast: bool = False):
    """Loss and every gradient bit-identical with the trainer's hooks (recompute.rebuilt_activations) and without."""
    from lorakit.layers import recompute
    model.train()
    results = []
    for lean in (True, False):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks on both passes
        with recompute.rebuilt_activations() if lean else torch.enable_grad(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = forward(model).float().square().mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert results[0][0] == results[1][0]
    for n, g in results[0][1].items():
        assert torch.equal(g, results[1][1][n]), n


@pytest.mark.parametrize("autocast", [False, True])
def test_rebuilt_activations_store_recipes_and_keep_gradients(ids, monkeypatch, autocast):
    """The trainer's saved-tensor hooks: SwiGLU's silu(g) (kept by the base's own mul) and the LoRA
    inputs are stored as recipes, and loss and gradients stay bit-identical, also under bf16 autocast
    (the trainer's GPU mode; backward, where recipes are replayed, runs outside autocast)."""
    from lorakit.layers import recompute
    model = lorakit.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    made, pack = [], recompute._pack
    monkeypatch.setattr(recompute, "_pack", lambda t: made.append(type(p := pack(t)).__name__) or p)
    _assert_rebuilt_activations_change_nothing(model, lambda m: m(input_ids=ids).logits, autocast)
    # per layer: silu(g) in the base's mul, and the LoRA inputs that recompute.plan handles without hooks
    # (layer 1's q/k/v, both layers' gate/up/down); everything else is stored as it is. Under autocast the
    # LoRA inputs reach A as views of bf16 casts: rebuilt too (the cast of the rebuilt input)
    assert made.count("_Recipe") == 2 + 3 + 3 * 2
    if not autocast:  # one replay per input however many LoRA layers read it
        replays = []
        for read in ("take", "peek"):
            monkeypatch.setattr(recompute.Shared, read, lambda self, f=getattr(recompute.Shared, read):
                                replays.append(self.value is None) or f(self))
        _assert_rebuilt_activations_change_nothing(model, lambda m: m(input_ids=ids).logits)
        # with the hooks: 11 recipes read, and silu(g) read again inside each down input's rebuild (13);
        # replays: q/k/v's input once (layer 1), gate/up's, down's and silu(g) once per layer (7).
        # Without: the 9 LoRA reads of rebuilt inputs, 5 replays
        assert (len(replays), sum(replays)) == (13 + 9, 7 + 5)


@pytest.mark.parametrize("variant", [dict(use_dora=True), dict(lora_dropout=0.3), dict(use_rslora=True, r=8)])
def test_rebuilt_activations_keep_gradients_of_general_path_variants(ids, variant):
    """DoRA and dropout take the general (autograd) path; the hooks change no value there either
    (dropout's random mask is kept by its own node, never redrawn)."""
    kw = {"r": 4, "target_modules": "all-linear", "init_lora_weights": False, **variant}
    model = lorakit.get_peft_model(tiny_llama(), LoraConfig(**kw))
    _assert_rebuilt_activations_change_nothing(model, lambda m: m(input_ids=ids).logits)


@pytest.mark.parametrize("kind", MODELS)
def test_rebuilt_activations_keep_gradients_across_architectures(kind, ids):
    """GPT-2 (Conv1D layers, a tanh-GELU written as products, model dropout) and BERT (GELU, LayerNorm)
    under the trainer's hooks: loss and gradients bit-identical to plain autograd."""
    _assert_rebuilt_activations_change_nothing(_model_with_adapter(kind, init=False), lambda m: m(input_ids=ids).logits)
