"""The llama.cpp adapter GGUF: keys, names, q/k rows, and llama.cpp's scale rule giving lorakit's s·B·A."""

import numpy as np
import pytest
import torch

import lorakit
from lorakit.errors import LorakitError
from lorakit.export.adapter import export_adapter_gguf, file_alpha, lora_pairs, write_lora_gguf
from lorakit.export.layout import layout_of, permute_rows

from conftest import tiny_gpt2, tiny_llama

gguf = pytest.importorskip("gguf")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def trained(model, **kw):
    """An adapter whose B is not zero (as after training)."""
    cfg = lorakit.LoraConfig(r=kw.pop("r", 4), lora_alpha=kw.pop("lora_alpha", 8), target_modules=TARGETS, **kw)
    lorakit.add_adapter(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lorakit.adapters.manage.lora_layers(model):
            layer.lora_B["default"].normal_(0, 0.1, generator=g)
    return model


def read(path):
    r = gguf.GGUFReader(str(path))
    kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("GGUF.")}
    return kv, {t.name: np.array(t.data) for t in r.tensors}, {t.name: [int(x) for x in t.shape] for t in r.tensors}


def llama_cpp_delta(kv, tensors, ne, name):
    """What llama.cpp adds to `name` at --lora-scale 1, restated: scale = alpha / b.ne[0] (alpha 0 -> 1)."""
    alpha = kv.get("adapter.lora.alpha", 0.0)
    rank = ne[name + ".lora_b"][0]
    scale = alpha / rank if alpha else 1.0
    return scale * tensors[name + ".lora_b"].astype(np.float64) @ tensors[name + ".lora_a"].astype(np.float64)


def expected_deltas(model):
    """lorakit's s·B·A per module, in GGUF names and row order."""
    layout = layout_of(model.config)
    out = {}
    for module, layer in lorakit.adapters.manage.lora_layers(model):
        delta = layer.delta_weight("default").detach().double().numpy()
        out[layout.gguf_name(module + ".weight")] = layout.to_gguf_rows(module, delta)
    return out


def test_permutation_is_inverted_by_transformers_gguf_loader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    w = np.random.default_rng(0).normal(size=(4 * 8, 5))
    back = LlamaTensorProcessor()._reverse_permute_weights(permute_rows(w, 4), 4, 4)
    assert np.array_equal(back, w) and not np.array_equal(permute_rows(w, 4), w)


def test_file_has_llama_cpp_keys_and_names(tmp_path):
    model = trained(tiny_llama())
    path = export_adapter_gguf(model, tmp_path / "a.gguf")
    kv, tensors, ne = read(path)
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora"
    assert kv["general.architecture"] == "llama" and kv["adapter.lora.alpha"] == 8.0
    assert "blk.1.attn_q.weight.lora_a" in tensors and "blk.0.ffn_down.weight.lora_b" in tensors
    assert len(tensors) == 2 * 2 * len(TARGETS)
    assert ne["blk.0.attn_k.weight.lora_a"] == [32, 4] and ne["blk.0.attn_k.weight.lora_b"] == [4, 16]


@pytest.mark.parametrize("kw", [
    {},                                                            # plain alpha/r
    {"use_rslora": True, "r": 8, "lora_alpha": 16},                # alpha/sqrt(r)
    {"rank_pattern": {"q_proj": 2, "down_proj": 6}},               # per-module rank
    {"alpha_pattern": {"v_proj": 32}, "rank_pattern": {"k_proj": 2}, "use_rslora": True},
    {"lora_alpha": 3, "r": 7},                                     # alpha/r not a short binary fraction
])
def test_llama_cpp_scale_rule_reproduces_lorakit(tmp_path, kw):
    model = trained(tiny_llama(), **kw)
    kv, tensors, ne = read(export_adapter_gguf(model, tmp_path / "a.gguf"))
    for name, want in expected_deltas(model).items():
        np.testing.assert_allclose(llama_cpp_delta(kv, tensors, ne, name), want, rtol=1e-5, atol=1e-7)


def test_uniform_rslora_keeps_b_and_writes_alpha_sqrt_r(tmp_path):
    model = trained(tiny_llama(), use_rslora=True, r=8, lora_alpha=16)
    kv, tensors, _ = read(export_adapter_gguf(model, tmp_path / "a.gguf"))
    assert kv["adapter.lora.alpha"] == pytest.approx(16 * np.sqrt(8), rel=1e-7)
    v = model.model.layers[0].self_attn.v_proj.lora_B["default"].detach().numpy()
    np.testing.assert_allclose(tensors["blk.0.attn_v.weight.lora_b"], v, rtol=1e-6)


def test_naive_conversion_shows_the_difference(tmp_path):
    """alpha/r for an rsLoRA adapter (what convert_lora_to_gguf does) is off by sqrt(r): the check can fail."""
    model = trained(tiny_llama(), use_rslora=True, r=8, lora_alpha=16)
    pairs = lora_pairs(model)
    naive = write_lora_gguf(tmp_path / "naive.gguf", "llama", [(p.name, p.A, p.B) for p in pairs], 16.0)
    kv, tensors, ne = read(naive)
    name, want = next(iter(expected_deltas(model).items()))
    got = llama_cpp_delta(kv, tensors, ne, name)
    np.testing.assert_allclose(got * np.sqrt(8), want, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got, want, rtol=1e-2)


def test_q_and_k_rows_are_permuted_others_not(tmp_path):
    model = trained(tiny_llama())
    _, tensors, _ = read(export_adapter_gguf(model, tmp_path / "a.gguf"))
    attn = model.model.layers[0].self_attn
    B = {m: getattr(attn, m).lora_B["default"].detach().numpy() for m in ("q_proj", "k_proj", "v_proj")}
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_b"], permute_rows(B["q_proj"], 4))
    assert np.array_equal(tensors["blk.0.attn_k.weight.lora_b"], permute_rows(B["k_proj"], 2))
    assert np.array_equal(tensors["blk.0.attn_v.weight.lora_b"], B["v_proj"])
    assert np.array_equal(tensors["blk.0.attn_q.weight.lora_a"], attn.q_proj.lora_A["default"].detach().numpy())


@pytest.mark.parametrize("kw, words", [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"bias": "lora_only"}, "bias"),
])
def test_what_gguf_cannot_hold_is_refused_pointing_at_merged(tmp_path, kw, words):
    model = trained(tiny_llama(), **kw)
    with pytest.raises(LorakitError, match=words) as e:
        export_adapter_gguf(model, tmp_path / "a.gguf")
    assert "--merged" in str(e.value) and not (tmp_path / "a.gguf").exists()


def test_embedding_and_tied_lm_head_adapters_are_refused(tmp_path):
    model = lorakit.add_adapter(tiny_llama(tie=True), lorakit.LoraConfig(target_modules=["embed_tokens", "lm_head"]))
    with pytest.raises(LorakitError, match="embedding.*\n.*lm_head.*tied|--merged"):
        export_adapter_gguf(model, tmp_path / "a.gguf")


def test_other_architectures_are_refused_naming_the_supported(tmp_path):
    model = lorakit.add_adapter(tiny_gpt2(), lorakit.LoraConfig(target_modules=["c_attn"]))
    with pytest.raises(LorakitError, match="llama.*mistral.*qwen2.*'gpt2'"):
        export_adapter_gguf(model, tmp_path / "a.gguf")


def test_file_alpha():
    assert file_alpha(lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj"])) == 32.0
    assert file_alpha(lorakit.LoraConfig(r=16, lora_alpha=32, use_rslora=True, target_modules=["q_proj"])) == 128.0
