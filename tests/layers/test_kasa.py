"""KaSA (layers/kasa.py) against PEFT 0.21's KasaLinearVariant: the same truncated base, the same draws,
the same outputs, files that load both ways, exact merge/unmerge, and clean errors where PEFT refuses."""

import copy

import peft
import pytest
import torch
from peft.tuners.lora.config import KasaConfig
from peft.tuners.lora.variants import _kasa_layer_regularization_loss
from torch import nn

import lorakit
from lorakit import LorakitError
from lorakit.layers.kasa import kasa_loss


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 20), nn.Linear(20, 12), nn.Linear(12, 2)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _pair(init=True, dtype=torch.float32, **kw):
    """The same base with the same KaSA config in PEFT and in lorakit, each drawn from seed 1."""
    torch.manual_seed(0)
    base = MLP().to(dtype)
    cfg = dict(target_modules=["lin0", "lin1"], r=4, kasa_config=KasaConfig(), init_lora_weights=init, **kw)
    torch.manual_seed(1)
    p = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    after_p = torch.rand(1)
    torch.manual_seed(1)
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**cfg))
    after_l = torch.rand(1)
    return base, p, lk, after_p, after_l


def _perturb(p, lk):
    """Trained-looking weights (B non-zero), set in PEFT and copied into lorakit through the file keys."""
    torch.manual_seed(5)
    with torch.no_grad():
        for n, t in p.named_parameters():
            if "lora_" in n:
                t.normal_()
    lorakit.set_peft_model_state_dict(lk, peft.get_peft_model_state_dict(p))


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_init_matches_peft_draw_for_draw(init):
    base, p, lk, after_p, after_l = _pair(init)
    assert torch.equal(after_p, after_l)  # the same RNG consumption
    sp, sl = peft.get_peft_model_state_dict(p), lorakit.get_peft_model_state_dict(lk)
    assert sorted(sp) == sorted(sl) and "base_model.model.lin0.lora_diag" in sl
    for k in sp:
        torch.testing.assert_close(sl[k], sp[k], rtol=0, atol=1e-6)
    for name in ("lin0", "lin1"):
        Wp = getattr(p.base_model.model, name).base_layer.weight
        Wl = getattr(lk.base_model.model, name).base_layer.weight
        torch.testing.assert_close(Wl, Wp, rtol=0, atol=1e-6)
    x = torch.randn(4, 10)
    torch.testing.assert_close(lk(x), p(x), rtol=0, atol=1e-5)


def test_base_weight_is_truncated_to_rank_k_minus_r():
    base, _, lk, _, _ = _pair()
    W0 = base.lin0.weight.detach()  # (20, 10): k = 10, r = 4
    W = lk.base_model.model.lin0.base_layer.weight.detach()
    s0, s = torch.linalg.svdvals(W0), torch.linalg.svdvals(W)
    torch.testing.assert_close(s[:6], s0[:6], rtol=1e-5, atol=1e-5)  # the 6 largest survive
    assert s[6:].abs().max() < 1e-5  # the 4 smallest are gone
    assert torch.linalg.matrix_rank(W) == 6
    assert not lk.base_model.model.lin0.base_layer.weight.requires_grad


def test_trained_outputs_and_merge_match_peft():
    _, p, lk, _, _ = _pair()
    _perturb(p, lk)
    x = torch.randn(5, 10)
    torch.testing.assert_close(lk(x), p(x), rtol=0, atol=1e-5)
    layer = lk.base_model.model.lin0
    W = layer.base_layer.weight.detach().clone()
    d, A, B = layer.lora_diag["default"], layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(layer.delta_weight("default"), (B * d) @ A * layer.scaling["default"])
    before = lk(x)
    lk.merge_adapter()
    p.merge_adapter()
    # merged, the same sums in another order: outputs of magnitude ~50 differ by a few fp32 ulps
    torch.testing.assert_close(lk(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lk(x), p(x), rtol=1e-5, atol=1e-5)
    lk.unmerge_adapter()
    torch.testing.assert_close(layer.base_layer.weight, W, rtol=0, atol=1e-6)  # back to the *truncated* weight
    merged = lk.merge_and_unload()
    assert not any(isinstance(m, lorakit.LoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_diagonal_and_factors_only():
    _, p, lk, _, _ = _pair()
    _perturb(p, lk)
    lk(torch.randn(3, 10)).sum().backward()
    layer = lk.base_model.model.lin0
    assert layer.lora_diag["default"].grad is not None and layer.lora_diag["default"].grad.abs().sum() > 0
    assert layer.base_layer.weight.grad is None
    trainable = sorted(n.removesuffix(".weight") for n, t in lk.named_parameters() if t.requires_grad)
    assert trainable == sorted(n.removesuffix(".weight") for n, t in p.named_parameters() if t.requires_grad)


@pytest.mark.parametrize("direction", ["peft_to_lorakit", "lorakit_to_peft"])
def test_files_load_both_ways(direction, tmp_path):
    base, p, lk, _, _ = _pair()
    _perturb(p, lk)
    x = torch.randn(4, 10)
    src = p if direction == "peft_to_lorakit" else lk
    src.save_pretrained(tmp_path)
    loader = lorakit.PeftModel if direction == "peft_to_lorakit" else peft.PeftModel
    torch.manual_seed(9)  # loading truncates the fresh base again (and draws d before the file overwrites it)
    loaded = loader.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=1e-5)


def test_low_cpu_mem_usage_defers_the_truncation_like_peft(tmp_path):
    base, p, lk, _, _ = _pair()
    _perturb(p, lk)
    x = torch.randn(4, 10)
    p.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    ours = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)  # the first forward, corrected
    torch.testing.assert_close(ours(x), p(x), rtol=0, atol=1e-5)  # and every later one
    torch.testing.assert_close(ours.base_model.model.lin0.base_layer.weight,
                               p.base_model.model.lin0.base_layer.weight, rtol=0, atol=1e-6)


def test_half_precision_base_keeps_peft_dtypes():
    _, p, lk, _, _ = _pair(dtype=torch.bfloat16)
    lp, ll = p.base_model.model.lin0, lk.base_model.model.lin0
    assert ll.lora_diag["default"].dtype == lp.lora_diag["default"].dtype == torch.float32
    assert ll.base_layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(ll.base_layer.weight, lp.base_layer.weight, rtol=0, atol=0)
    torch.testing.assert_close(ll.lora_diag["default"], lp.lora_diag["default"], rtol=0, atol=0)


def test_regulariser_matches_peft():
    _, p, lk, _, _ = _pair()
    _perturb(p, lk)
    ours = kasa_loss(lk.base_model.model.lin0, "default", beta=1e-2, gamma=1e-1)
    ref = _kasa_layer_regularization_loss(p.base_model.model.lin0, "default", beta=1e-2, gamma=1e-1)
    torch.testing.assert_close(ours, ref)


def test_config_round_trips_in_peft_form(tmp_path):
    cfg = lorakit.LoraConfig(target_modules=["lin0"], r=4, kasa_config=KasaConfig(beta=0.5, gamma=0.25))
    assert cfg.to_dict()["kasa_config"] == {"beta": 0.5, "gamma": 0.25}
    cfg.save(tmp_path)
    assert peft.LoraConfig.from_pretrained(tmp_path).kasa_config == KasaConfig(beta=0.5, gamma=0.25)
    assert lorakit.LoraConfig.load(tmp_path).kasa_config == {"beta": 0.5, "gamma": 0.25}


@pytest.mark.parametrize("kw, message", [
    (dict(target_modules=["lin0"], r=10), "KaSA requires r"),  # r == min(in, out) = 10
    (dict(target_modules=["lin0"], r=4, use_dora=True), "use_dora and kasa_config cannot be combined"),
    (dict(target_modules=["lin0"], r=4, lora_bias=True), "cannot be combined with lora_bias"),
    (dict(target_modules=["lin0"], r=4, init_lora_weights="pissa"), "cannot be combined with init_lora_weights"),
])
def test_refusals_are_lorakit_errors(kw, message):
    with pytest.raises(LorakitError, match=message):
        lorakit.get_peft_model(MLP(), lorakit.LoraConfig(kasa_config=KasaConfig(), **kw))


def test_conv1d_and_embedding_layers_are_refused():
    from transformers.pytorch_utils import Conv1D
    model = nn.Sequential(nn.Embedding(30, 8), Conv1D(6, 8))
    with pytest.raises(LorakitError, match="fan_in_fan_out"):
        lorakit.get_peft_model(copy.deepcopy(model), lorakit.LoraConfig(target_modules=["1"], r=2,
                                                                        kasa_config=KasaConfig()))
    with pytest.raises(LorakitError, match="does not support KaSA"):
        lorakit.get_peft_model(copy.deepcopy(model), lorakit.LoraConfig(target_modules=["0"], r=2,
                                                                        kasa_config=KasaConfig()))


def test_kasa_and_plain_adapters_never_share_a_model():
    lk = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], r=4, kasa_config=KasaConfig()))
    with pytest.raises(LorakitError, match="KaSA cannot be combined"):
        lk.add_adapter("plain", lorakit.LoraConfig(target_modules=["lin0"], r=4))
    lk.add_adapter("other", lorakit.LoraConfig(target_modules=["lin1"], r=4, kasa_config=KasaConfig()))
    plain = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(target_modules=["lin0"], r=4))
    with pytest.raises(LorakitError, match="KaSA cannot be combined"):
        plain.add_adapter("k", lorakit.LoraConfig(target_modules=["lin0"], r=4, kasa_config=KasaConfig()))


def test_serving_and_gguf_export_refuse_kasa(tmp_path):
    from lorakit.export.adapter import lora_pairs
    from lorakit.serve.registry import read_for_serving
    _, _, lk, _, _ = _pair()
    lk.save_pretrained(tmp_path)
    with pytest.raises(LorakitError, match="KaSA"):
        read_for_serving(tmp_path)
    from conftest import tiny_llama
    llama = lorakit.add_adapter(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], r=4,
                                                                 kasa_config=KasaConfig()))
    with pytest.raises(LorakitError, match="KaSA"):
        lora_pairs(llama)


def test_model_regulariser_matches_peft_get_kasa_loss():
    _, p, lk, _, _ = _pair()
    _perturb(p, lk)
    torch.testing.assert_close(lk.base_model._get_kasa_loss(), p.base_model._get_kasa_loss())
    torch.testing.assert_close(lk._get_kasa_loss("default"), p._get_kasa_loss("default"))
    assert lorakit.adapters.manage.kasa_loss(MLP(), []) == 0.0
