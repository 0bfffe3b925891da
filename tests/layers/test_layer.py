"""The LoRA math as properties: no-op init, disable = base, merge = unmerged, unmerge restores W0."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from conftest import MODELS, logits, tiny_gpt2, tiny_llama

TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}
VARIANTS = [{}, {"use_rslora": True}, {"use_dora": True}, {"lora_dropout": 0.1}]


def _model_with_adapter(kind, init=True, **kw):
    model = MODELS[kind]()
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind], init_lora_weights=init, **kw)
    return lorakit.add_adapter(model, cfg)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_default_init_is_exact_noop(kind, variant, ids):
    base = logits(MODELS[kind](), ids)
    model = _model_with_adapter(kind, **variant)
    assert torch.equal(logits(model, ids), base) or torch.allclose(logits(model, ids), base, atol=1e-6, rtol=0)


def test_embedding_default_init_is_exact_noop(ids):
    base = logits(tiny_llama(), ids)
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["embed_tokens"]))
    assert torch.equal(logits(model, ids), base)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_disabled_equals_base(kind, variant, ids):
    base = logits(MODELS[kind](), ids)
    model = _model_with_adapter(kind, init=False, **variant)
    assert not torch.allclose(logits(model, ids), base, atol=1e-4)
    with lorakit.disable_adapters(model):
        assert torch.equal(logits(model, ids), base)
    assert not torch.allclose(logits(model, ids), base, atol=1e-4)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("variant", VARIANTS[:3])
def test_merge_equals_unmerged_and_unmerge_restores(kind, variant, ids):
    model = _model_with_adapter(kind, init=False, **variant)
    weights0 = {k: v.clone() for k, v in model.state_dict().items() if "base_layer.weight" in k}
    unmerged = logits(model, ids)
    lorakit.merge(model)
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    lorakit.unmerge(model)
    for k, w in model.state_dict().items():
        if k in weights0:
            assert torch.allclose(w, weights0[k], atol=1e-6, rtol=0), k
    assert torch.allclose(logits(model, ids), unmerged, atol=1e-5, rtol=0)
    plain = lorakit.merge_and_unload(model)
    assert not any(isinstance(m, lorakit.LoraLayer) for m in plain.modules())
    assert torch.allclose(logits(plain, ids), unmerged, atol=1e-5, rtol=0)


def test_embedding_and_conv1d_merge(ids):
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["embed_tokens", "o_proj"],
                                                         init_lora_weights=False))
    before = logits(model, ids)
    merged = lorakit.merge_and_unload(model)
    assert torch.allclose(logits(merged, ids), before, atol=1e-5, rtol=0)


def test_safe_merge_refuses_nan(ids):
    model = _model_with_adapter("llama", init=False)
    layer = next(m for _, m in lorakit.lora_layers(model))
    with torch.no_grad():
        layer.lora_B["default"][0, 0] = float("nan")
    w0 = layer.base_layer.weight.clone()
    with pytest.raises(lorakit.LorakitError, match="NaN/Inf"):
        lorakit.merge(model, safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0)


def _train_step(model, ids, steps=1):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return loss.item()


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"lora_fa": True}, {"bias": "lora_only"},
                                     {"modules_to_save": ["lm_head"]}])
def test_only_adapter_parameters_change(variant, ids):
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **variant))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, ids, steps=2)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    allowed = (".lora_B.", ".lora_magnitude_vector.", ".modules_to_save.") + (() if variant.get("lora_fa") else (".lora_A.",))
    allowed_bias = variant.get("bias") == "lora_only"
    assert changed, "nothing trained"
    for k in changed:
        assert any(a in k for a in allowed) or (allowed_bias and k.endswith("base_layer.bias")), k
    if variant.get("lora_fa"):
        assert not any(".lora_A." in k for k in changed)


def test_training_lowers_loss(ids):
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    first = _train_step(model, ids, 1)
    last = _train_step(model, ids, 30)
    assert last < first - 0.4, (first, last)  # 4.59 -> 3.97 measured (same as PEFT)


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


def test_gpt2_conv1d_sets_fan_in_fan_out():
    model = lorakit.add_adapter(tiny_gpt2(), LoraConfig(r=2, target_modules=["c_attn"]))
    assert lorakit.adapters.configs(model)["default"].fan_in_fan_out is True


def test_lora_plus_groups():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    opt = lorakit.lora_plus_optimizer(model, lr=1e-4, ratio=16)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"A": 1e-4, "B": 1.6e-3}
    n_b = sum(p.numel() for g in opt.param_groups if g["name"] == "B" for p in g["params"])
    assert n_b == sum(l.lora_B["default"].numel() for _, l in lorakit.lora_layers(model))


def test_later_adapters_reach_wrapped_layers_and_delete_cleanly():
    """A second adapter (list targets or all-linear) lands in layers the first already wrapped."""
    model = tiny_llama()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "b")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules="all-linear"), "c")
    q = model.model.layers[0].self_attn.q_proj
    assert set(q.lora_A) == {"a", "b", "c"} and set(model.model.layers[1].mlp.up_proj.lora_A) == {"c"}
    lorakit.delete_adapter(model, "b")
    assert set(q.lora_A) == {"a", "c"} and "b" not in q.r


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}])
def test_no_grad_fast_path_equals_autograd_path(kind, variant, ids):
    """Outside autograd the adapters accumulate into the base output in place; same numbers as with grad."""
    model = _model_with_adapter(kind, init=False, **variant)
    with torch.enable_grad():
        with_grad = model(input_ids=ids).logits.detach()
    assert torch.allclose(logits(model, ids), with_grad, atol=1e-6, rtol=0)


def test_in_place_fast_path_leaves_hooked_base_output_alone(ids):
    """A forward hook on the base layer keeps the base output it saw: no in-place update when hooked."""
    model = _model_with_adapter("llama", init=False)
    layer = model.model.layers[0].self_attn.q_proj
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)))
    try:
        logits(model, ids)
    finally:
        handle.remove()
    x, out = seen[0]
    assert torch.equal(out, torch.nn.functional.linear(x, layer.base_layer.weight))


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
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


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


def test_fused_path_rebuilds_gelu_input_in_bert(ids):
    """BERT-style MLPs: the output dense layer's input gelu(h) is rebuilt from h, which GELU keeps."""
    from conftest import tiny_bert
    model = lorakit.get_peft_model(tiny_bert(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    nodes = _lora_nodes(model(input_ids=ids).logits.square().mean())
    rebuilt = [node for node in nodes if node.saved_tensors[0] is None]
    assert len(nodes) == 14 and len(rebuilt) == 2  # 2 layers x 6 projections + pooler + classifier; 1 GELU each layer
    assert all(type(node.x_rebuild.node).__name__ == "GeluBackward0" for node in rebuilt)


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
