"""Model-level adapter arithmetic (combine.py, combine_dirs.py) against dense ΔW written out by hand.

The reference for every combination is a plain copy of the base model whose weights are set to
W0 + Σ w_i ΔW_i, with ΔW_i = s_i · B_i @ A_i (s_i from the config: alpha/r or alpha/sqrt(r)) or, for
DoRA, m/‖W0 + ΔW_i‖_row · (W0 + ΔW_i) − W0, computed here in float64. PEFT is the second reference:
it loads the folders lorakit writes, and its own add_weighted_adapter is compared where it is right
(plain LoRA) and shown off where it is not (rsLoRA, PEFT issue #3761).
"""

import math

import pytest
import torch

import lorakit
from lorakit import LoraConfig, LorakitError, combine_adapter_dirs, combine_adapters, negate_adapter
from conftest import logits, tiny_gpt2, tiny_llama

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# "a": r=4 on attention (+ the embedding; GPT-2 ties it to its head, which the reference would change); "b": rsLoRA, r=2 (6 on some modules), partly other modules
SPECS = {
    "llama": [("a", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"])),
              ("b", dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "down_proj"],
                         rank_pattern={"down_proj": 6}))],
    "gpt2": [("a", dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"])),
             ("b", dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["c_attn", "c_fc"],
                        rank_pattern={"c_fc": 6}))],
}


def with_adapters(kind="llama", specs=None, **extra):
    model = MODELS[kind]()
    for seed, (name, kw) in enumerate(specs or SPECS[kind]):
        torch.manual_seed(10 + seed)
        lorakit.add_adapter(model, LoraConfig(init_lora_weights=False, **kw, **extra), name)
    return model


def dense_delta(layer, name):
    """ΔW of one adapter in the base weight's stored layout, float64, from the formula."""
    A, B = layer.lora_A[name].double(), layer.lora_B[name].double()
    d = layer.scaling[name] * (B @ A)  # (out, in)
    if name in layer.lora_magnitude_vector:
        W0 = layer.dense_weight().double()
        W = W0 + d
        d = (layer.lora_magnitude_vector[name].double() / W.norm(dim=1))[:, None] * W - W0
    return d.T if layer.kind in ("embedding", "conv1d") else d


def reference(kind, model, names, weights):
    """A fresh base model with W0 + Σ w_i ΔW_i written into its weights."""
    ref = MODELS[kind]()
    with torch.no_grad():
        for mod, layer in lorakit.lora_layers(model):
            W = ref.get_submodule(mod).weight
            total = sum(w * dense_delta(layer, n) for n, w in zip(names, weights) if n in layer.lora_A)
            if isinstance(total, torch.Tensor):
                W.copy_((W.double() + total).to(W.dtype))
    return ref


def run_adapter(model, name, ids):
    lorakit.set_adapter(model, name)
    return logits(model, ids)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_exact_methods_equal_dense_arithmetic(kind, method, ids):
    """Different ranks, alphas, rsLoRA, rank_pattern, modules only one adapter targets, the embedding."""
    model = with_adapters(kind)
    report = combine_adapters(model, ["a", "b"], [0.7, -0.3], method, new_name="ab")
    assert report.max_error < 1e-6, report
    expected = logits(reference(kind, model, ["a", "b"], [0.7, -0.3]), ids)
    torch.testing.assert_close(run_adapter(model, "ab", ids), expected, atol=1e-5, rtol=0)
    cfg = lorakit.adapters.configs(model)["ab"]
    assert cfg.use_rslora is False and cfg.lora_alpha == cfg.r and not cfg.use_dora  # scaling 1 at rank r


def test_rslora_combination_is_right_where_peft_is_off(tmp_path, ids):
    """Two rsLoRA adapters, combined exactly ('svd' at rank Σ r_i): lorakit matches the dense ΔW. PEFT's
    add_weighted_adapter gives the new adapter alpha = r with use_rslora kept, so its scaling is
    r/sqrt(r) = sqrt(r) instead of 1 and its ΔW comes out sqrt(r) times too large (PEFT issue #3761)."""
    import peft

    specs = [(n, dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"])) for n in "ab"]
    model = with_adapters("llama", specs)
    for n in "ab":
        lorakit.save_adapter(model, tmp_path / n, n)
    combine_adapters(model, ["a", "b"], [1.0, 0.5], "svd", rank=8, new_name="ab")
    cfg = lorakit.adapters.configs(model)["ab"]
    assert cfg.use_rslora and cfg.r == 8 and math.isclose(cfg.lora_alpha, math.sqrt(8))
    expected = logits(reference("llama", model, ["a", "b"], [1.0, 0.5]), ids)
    torch.testing.assert_close(run_adapter(model, "ab", ids), expected, atol=1e-5, rtol=0)

    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [1.0, 0.5], "ab", combination_type="svd", svd_rank=8)
    layer, peft_layer = model.model.layers[0].self_attn.q_proj, pm.base_model.model.model.layers[0].self_attn.q_proj
    ours = dense_delta(layer, "ab")
    truth = dense_delta(layer, "a") + 0.5 * dense_delta(layer, "b")
    theirs = peft_layer.get_delta_weight("ab").double()
    torch.testing.assert_close(ours, truth, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs, math.sqrt(8) * truth, atol=1e-4, rtol=1e-4)  # PEFT: off by sqrt(r)


def test_plain_lora_agrees_with_peft_add_weighted_adapter(tmp_path, ids):
    """Where PEFT is right (plain LoRA, equal ranks, exact svd), lorakit's PEFT-style call gives its logits."""
    import peft

    specs = [(n, dict(r=4, lora_alpha=a, target_modules=["q_proj", "v_proj", "down_proj"]))
             for n, a in (("a", 8), ("b", 4))]
    model = with_adapters("llama", specs)
    for n in "ab":
        lorakit.save_adapter(model, tmp_path / n, n)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    pm.load_adapter(tmp_path / "b", adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.6, 0.4], "ab", combination_type="svd", svd_rank=8)
    pm.set_adapter("ab")
    ours = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    report = ours.add_weighted_adapter(["a", "b"], [0.6, 0.4], "ab", combination_type="svd", svd_rank=8)
    ours.set_adapter("ab")
    assert report.max_error < 1e-6
    torch.testing.assert_close(logits(ours, ids), logits(pm, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["ties", "magnitude_prune_svd", "dare_linear", "dare_ties_svd"])
def test_density_methods_match_peft_merge_utils(method):
    """At full rank the new ΔW is exactly the method's dense merge (PEFT's merge_utils as the reference)."""
    from peft.utils import merge_utils

    model = with_adapters("llama")
    density = 1.0 if method.startswith("dare") else 0.5  # dare at density 1 is deterministic
    combine_adapters(model, ["a", "b"], [0.7, 0.3], method, rank=32, new_name="m", density=density)
    fn = {"ties": merge_utils.ties, "magnitude_prune_svd": merge_utils.magnitude_prune,
          "dare_linear": merge_utils.dare_linear, "dare_ties_svd": merge_utils.dare_ties}[method]
    for mod, layer in lorakit.lora_layers(model):
        present = [(n, w) for n, w in (("a", 0.7), ("b", 0.3)) if n in layer.lora_A]
        deltas = [dense_delta(layer, n) for n, _ in present]
        kw = {} if "magnitude" in method or method == "dare_linear" else {"majority_sign_method": "total"}
        expected = fn(deltas, torch.tensor([w for _, w in present], dtype=torch.float64), density, **kw)
        torch.testing.assert_close(dense_delta(layer, "m"), expected, atol=1e-5, rtol=1e-5, msg=mod)


def test_dare_is_reproducible_with_a_generator():
    model = with_adapters("llama")
    for name in ("d1", "d2"):
        combine_adapters(model, ["a", "b"], [0.5, 0.5], "dare_ties", rank=4, new_name=name, density=0.5,
                         generator=torch.Generator().manual_seed(0))
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_B["d1"], layer.lora_B["d2"])


def test_truncation_report(ids):
    model = with_adapters("llama")
    report = combine_adapters(model, ["a", "b"], [1.0, 1.0], "linear", rank=2, new_name="low")
    layer = model.model.layers[0].self_attn.q_proj
    target = dense_delta(layer, "a") + dense_delta(layer, "b")
    err = ((dense_delta(layer, "low") - target).norm() / target.norm()).item()
    entry = report.modules["model.layers.0.self_attn.q_proj"]
    assert entry["rank"] == 2 and entry["adapters"] == ["a", "b"]
    assert math.isclose(entry["relative_error"], err, rel_tol=1e-4) and err > 0.05
    assert report.max_error >= report.mean_error > 0 and "max" in str(report) and report.worst_module


def test_dora_adapters_combine_into_plain_lora(ids):
    """DoRA (magnitudes moved off ||W0 + ΔW||) combined at full rank equals the weighted effective deltas."""
    model = with_adapters("llama", [(n, dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"]))
                                    for n in "ab"])
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for n in "ab":
                layer.lora_magnitude_vector[n].mul_(1 + 0.3 * torch.rand_like(layer.lora_magnitude_vector[n]))
    report = combine_adapters(model, ["a", "b"], [0.6, 0.4], "linear", rank=32, new_name="ab")
    cfg = lorakit.adapters.configs(model)["ab"]
    assert not cfg.use_dora and not model.model.layers[0].self_attn.q_proj.lora_magnitude_vector.get("ab")
    assert report.max_error < 1e-6
    expected = logits(reference("llama", model, ["a", "b"], [0.6, 0.4]), ids)
    torch.testing.assert_close(run_adapter(model, "ab", ids), expected, atol=1e-5, rtol=0)
    low = combine_adapters(model, ["a", "b"], [0.6, 0.4], "linear", rank=2, new_name="ab2")
    assert low.max_error > 1e-3  # effective deltas are full rank: rank 2 truncates, and says so


@pytest.mark.parametrize("kind", MODELS)
def test_negated_adapter_cancels(kind, ids):
    model = with_adapters(kind)
    report = negate_adapter(model, "b", "minus_b")
    assert report.max_error == 0
    lorakit.set_adapter(model, ["b", "minus_b"])
    torch.testing.assert_close(logits(model, ids), logits(MODELS[kind](), ids), atol=1e-5, rtol=0)
    layer = model.get_submodule(next(m for m, lay in lorakit.lora_layers(model) if "b" in lay.lora_A))
    assert layer.r["minus_b"] == layer.r["b"]  # same ranks, rank_pattern carried over


def test_folder_combine_loads_in_peft_and_lorakit(tmp_path, ids):
    import peft

    model = with_adapters("llama")
    for n in "ab":
        lorakit.save_adapter(model, tmp_path / n, n)
    report = combine_adapter_dirs([tmp_path / "a", tmp_path / "b"], [0.7, -0.3], "linear", None, tmp_path / "ab")
    assert report.max_error < 1e-6 and (tmp_path / "ab" / "adapter_config.json").is_file()
    expected = logits(reference("llama", model, ["a", "b"], [0.7, -0.3]), ids)
    ours = lorakit.load_adapter(tiny_llama(), tmp_path / "ab")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ab")
    torch.testing.assert_close(logits(ours, ids), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), atol=1e-5, rtol=0)
    meta = lorakit.read_adapter(tmp_path / "ab")[0]
    assert meta.rank_pattern  # q_proj and down_proj have other ranks than v_proj / the embedding


def test_folder_combine_of_dora_needs_the_base(tmp_path, ids):
    model = with_adapters("llama", [(n, dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj"]))
                                    for n in "ab"])
    for n in "ab":
        lorakit.save_adapter(model, tmp_path / n, n)
    dirs = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(LorakitError, match="base_model"):
        combine_adapter_dirs(dirs, [0.5, 0.5], "linear", 32, tmp_path / "ab")
    combine_adapter_dirs(dirs, [0.5, 0.5], "linear", 32, tmp_path / "ab", base_model=tiny_llama())
    expected = logits(reference("llama", model, ["a", "b"], [0.5, 0.5]), ids)
    torch.testing.assert_close(logits(lorakit.load_adapter(tiny_llama(), tmp_path / "ab"), ids), expected,
                               atol=1e-5, rtol=0)


# -- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, kwargs, match", [
    ((["a", "zz"], [1, 1], "linear"), {}, "no adapter named 'zz'"),
    ((["a", "b"], [1.0], "linear"), {}, "one weight per adapter"),
    ((["a", "b"], [1, 1], "cat"), {"rank": 4}, "exact with rank"),
    ((["a", "b"], [1, 1], "ties"), {}, "needs density"),
    ((["a", "b"], [1, 1], "average"), {}, "unknown method"),
    ((["a", "b"], [1, 1], "linear"), {"new_name": "a"}, "already exists"),
    (([], [], "linear"), {}, "non-empty list"),
])
def test_bad_input_is_a_clear_error(args, kwargs, match):
    model = with_adapters("llama")
    with pytest.raises(LorakitError, match=match):
        combine_adapters(model, *args, **kwargs)


def test_refusals():
    model = with_adapters("llama", [("a", dict(r=2, target_modules=["q_proj"], use_dora=True)),
                                    ("b", dict(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))])
    with pytest.raises(LorakitError, match="'cat' cannot combine"):
        combine_adapters(model, ["a"], [1.0], "cat", new_name="x")
    with pytest.raises(LorakitError, match="modules_to_save"):
        combine_adapters(model, ["b"], [1.0], "linear", new_name="x")
    with pytest.raises(LorakitError, match="svd_clamp"):
        lorakit.add_weighted_adapter(model, ["a"], [1.0], "x", svd_clamp=0.9)
    with pytest.raises(LorakitError, match="drop the rank"):
        negate_adapter(with_adapters("llama"), "a", "x", rank=2)
    with pytest.raises(LorakitError, match="cannot read"):
        combine_adapter_dirs(["/nonexistent/a"], [1.0], "linear", None, "/tmp/never")
