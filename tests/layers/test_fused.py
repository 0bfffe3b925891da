"""The training fast path (layers/fused.py): one autograd node per LoRA linear, equal to the formula and to
the general path; its input rebuilt in backward (recompute.py) instead of kept."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from conftest import MODELS, model_with_adapter, tiny_llama

_model_with_adapter = model_with_adapter


def _reference_grads(layer, x, name="default"):
    """Plain autograd on the formula y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ: the independent restatement."""
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = torch.nn.functional.linear(x, W, b) + s * (x @ A.T) @ B.T
    return y, x


@pytest.mark.parametrize("case", ["plain", "bias_trained", "lora_fa", "input_frozen", "many_tokens"])
def test_fused_training_path_matches_autograd_formula(case):
    """The training fast path (one autograd node per layer) gives the formula's output and gradients."""
    from lorakit.layers import LoraLayer
    torch.manual_seed(0)
    layer = LoraLayer(torch.nn.Linear(12, 7, bias=case == "bias_trained"))
    layer.base_layer.requires_grad_(False)
    layer.add("default", r=3, scaling=1.7)
    layer.active_adapters = ["default"]
    torch.nn.init.normal_(layer.lora_B["default"])
    if case == "bias_trained":
        layer.base_layer.bias.requires_grad_(True)
    if case == "lora_fa":
        layer.lora_A["default"].requires_grad_(False)
    rows = 20 if case == "many_tokens" else 5  # more tokens than inputs and outputs
    x = torch.randn(2, rows, 12, requires_grad=case != "input_frozen")
    assert layer._fused_adapter(x, (), {}) == "default"
    g = torch.randn(2, rows, 7)
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_LoraLinearBackward"
    params = [p for p in layer.parameters() if p.requires_grad]
    got = torch.autograd.grad(y, ([x] if x.requires_grad else []) + params, g)
    y_ref, x_ref = _reference_grads(layer, x)
    want = torch.autograd.grad(y_ref, ([x_ref] if x.requires_grad else []) + params, g)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(got, want, strict=True):  # gradients sum over all tokens: fp32 error grows with their scale
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("kind", MODELS)
def test_fused_training_path_gives_model_gradients_of_general_path(kind, ids, monkeypatch):
    """Whole model: the loss and every adapter gradient equal those of the general path (fused off)."""
    model = _model_with_adapter(kind, init=False)
    model.train()
    calls, apply = [], lorakit.layers.fused._LoraLinear.apply
    monkeypatch.setattr(lorakit.layers.fused._LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    results = []
    for fused in (True, False):
        if not fused:
            assert calls or kind == "gpt2"  # GPT-2's Conv1D layers take the general path
            monkeypatch.setattr(lorakit.layers.LoraLayer, "_fused_adapter", lambda self, x, a, k: None)
        model.zero_grad()
        torch.manual_seed(0)  # the same model dropout masks (GPT-2, BERT) on both passes
        loss = model(input_ids=ids).logits.square().mean()  # any scalar of the outputs will do
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-6)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], rtol=1e-5, atol=1e-7), n


def _lora_nodes(loss):
    """Every _LoraLinear autograd node in loss's graph."""
    seen, stack, found = set(), [loss.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_LoraLinearBackward":
            found.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return found


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_path_rebuilds_norm_and_swiglu_inputs_instead_of_keeping_them(ids, monkeypatch, dtype):
    """Memory: the inputs of q/k/v and gate/up (RMSNorm outputs) and of down (silu(g)·u) are not kept
    when the base keeps their factors; backward multiplies the factors again, with gradients
    bit-identical to keeping them. bf16: RMSNorm's cast back from fp32 is rebuilt too."""
    cfg = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    model = lorakit.get_peft_model(tiny_llama().to(dtype), cfg).to(dtype)
    model.train()
    grads = []
    for rebuild in (True, False):
        if not rebuild:
            monkeypatch.setattr(lorakit.layers.recompute, "plan", lambda x: None)
        model.zero_grad()
        loss = model(input_ids=ids).logits.square().mean()
        nodes = _lora_nodes(loss)
        assert len(nodes) == 14  # 2 layers x 7 projections
        kept = sum(node.saved_tensors[0] is not None for node in nodes)
        # kept when rebuilding: layer 0's q/k/v (input from frozen embeddings: nothing to rebuild from)
        # and both o_proj (a view of the attention output, which attention keeps itself)
        assert kept == (5 if rebuild else 14)
        replays = []
        take = lorakit.layers.recompute.Shared.take
        monkeypatch.setattr(lorakit.layers.recompute.Shared, "take",
                            lambda self: replays.append(self.value is None) or take(self))
        loss.backward()
        # one replay per shared input: layer 1's q/k/v input, and each layer's gate/up input and down input
        assert (len(replays), sum(replays)) == ((9, 5) if rebuild else (0, 0))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_fused_path_rebuilds_gelu_input_in_bert(ids):
    """BERT-style MLPs: the output dense layer's input gelu(h) is rebuilt from h, which GELU keeps."""
    from conftest import tiny_bert
    model = lorakit.get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    nodes = _lora_nodes(model(input_ids=ids).logits.square().mean())
    rebuilt = [node for node in nodes if node.saved_tensors[0] is None]
    assert len(nodes) == 14 and len(rebuilt) == 2  # 2 layers x 6 projections + pooler + classifier; 1 GELU each layer
    assert all(type(node.x_rebuild.node).__name__ == "GeluBackward0" for node in rebuilt)
