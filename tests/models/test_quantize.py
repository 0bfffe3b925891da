"""QLoRA: LoRA on bitsandbytes 4-bit (nf4, fp4) and 8-bit bases, checked against PEFT and full precision.

Tiny random Llama models built from a config (no download). Logits are compared in train mode with
dropout 0, where bitsandbytes computes in the configured compute dtype (in eval mode its CPU int8 path
quantizes activations and PEFT's 4-bit layers switch to a bf16 kernel). Runs on CPU in a few seconds.
"""

from __future__ import annotations

import builtins
import copy
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lorakit  # noqa: E402
from lorakit.layers import bnb as bnb_layers  # noqa: E402
from lorakit.models import quantize  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402
from lorakit.layers import LoraLayer, layer_kind  # noqa: E402

KINDS = ["nf4", "fp4", "int8"]
BNB_CLASS = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}
VOCAB = 128



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: with 2 threads on a shared CPU, OpenMP waiting costs ~1000x the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


def ids(seed: int = 0, shape=(2, 12)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.train()  # dropout is 0: deterministic, and bitsandbytes runs its compute_dtype path
    return model(x).logits.float()


def lk_config(**kw) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**{"r": 4, "lora_alpha": 16, "target_modules": "all-linear", **kw})


def pf_config(**kw) -> peft.LoraConfig:
    return peft.LoraConfig(**{"r": 4, "lora_alpha": 16, "target_modules": "all-linear", **kw})


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every adapter tensor a random offset, so B != 0 and the adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters()):
        if "lora_" in name:
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


@torch.no_grad()
def copy_peft_adapters_into_lorakit(src: nn.Module, dst: nn.Module) -> int:
    """PEFT keeps lora_A.default.weight / lora_magnitude_vector.default.weight; lorakit lora_A.default."""
    theirs = dict(src.named_parameters())
    n = 0
    for name, p in dst.named_parameters():
        if "lora_" in name:
            p.copy_(theirs[name + ".weight"])
            n += 1
    return n


# -- configuration ------------------------------------------------------------------------------------------

def test_bnb_layers_are_linear_subclasses():
    for cls in (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt):
        assert issubclass(cls, nn.Linear)
    q = quantize.quantize_linear(nn.Linear(64, 32), "nf4")
    assert layer_kind(q) == "linear" and bnb_layers.is_quantized(q)
    assert not bnb_layers.is_quantized(nn.Linear(4, 4))


def test_quantization_config():
    c = quantize.quantization_config("nf4")
    assert c.load_in_4bit and c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_use_double_quant
    assert c.bnb_4bit_compute_dtype == torch.float32  # CPU default
    assert quantize.quantization_config("fp4", compute_dtype=torch.bfloat16).bnb_4bit_compute_dtype == torch.bfloat16
    assert quantize.quantization_config("nf4", device="cuda").bnb_4bit_compute_dtype == torch.bfloat16
    assert quantize.quantization_config("int8").load_in_8bit
    assert quantize.quantization_config("none") is None
    with pytest.raises(LorakitError, match="unknown quantisation kind 'nf8'.*nf4"):
        quantize.quantization_config("nf8")


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    for call in (lambda: quantize.quantization_config("nf4"), lambda: quantize.quantize_model(tiny_llama(), "nf4"),
                 lambda: quantize.quantize_linear(nn.Linear(64, 64), "int8")):
        with pytest.raises(LorakitError, match="pip install bitsandbytes"):
            call()


def test_unsupported_inputs_raise_clear_errors():
    with pytest.raises(LorakitError, match="plain nn.Linear"):
        quantize.quantize_linear(nn.Conv1d(4, 4, 1), "nf4")
    with pytest.raises(LorakitError, match="Linear4bit or Linear8bitLt, got Linear"):
        bnb_layers.dequantize_weight(nn.Linear(4, 4))
    with pytest.raises(LorakitError, match="no plain nn.Linear"):
        quantize.quantize_model(nn.Sequential(nn.Embedding(4, 4)), "nf4")
    wrapped = lorakit.add_adapter(tiny_llama(), lk_config())
    with pytest.raises(LorakitError, match="before adapters are added"):
        quantize.quantize_model(wrapped, "nf4")
    q = quantize.quantize_linear(nn.Linear(64, 32), "nf4")
    with pytest.raises(LorakitError, match=r"shape \(32, 32\).*\(32, 64\)"):
        bnb_layers.requantize_weight(q, torch.zeros(32, 32))
    with pytest.raises(LorakitError, match="cannot add LoRA to GRU"):  # (Conv1d became a base kind: issue 16)
        LoraLayer(nn.GRU(4, 4))


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_model_matches_transformers_loader(kind, tmp_path):
    """quantize_model builds the same layers, bit for bit, as from_pretrained(quantization_config=...)."""
    tiny_llama().save_pretrained(tmp_path)
    ours = quantize.quantize_model(LlamaForCausalLM.from_pretrained(tmp_path), kind)
    theirs = LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=quantize.quantization_config(kind),
                                              device_map="cpu")
    assert type(ours.lm_head) is nn.Linear and type(theirs.lm_head) is nn.Linear
    mods = dict(theirs.named_modules())
    n = 0
    for name, mod in ours.named_modules():
        if not bnb_layers.is_quantized(mod):
            continue
        other = mods[name]
        assert type(mod) is type(other) and type(mod).__name__ == BNB_CLASS[kind]
        assert torch.equal(mod.weight.data, other.weight.data)
        assert torch.equal(bnb_layers.dequantize_weight(mod), bnb_layers.dequantize_weight(other))
        if kind != "int8":
            qa, qb = mod.weight.quant_state, other.weight.quant_state
            assert (qa.quant_type, qa.blocksize, qa.nested, mod.compute_dtype) == \
                   (qb.quant_type, qb.blocksize, qb.nested, other.compute_dtype)
        else:
            assert mod.state.threshold == other.state.threshold and not mod.state.has_fp16_weights
        n += 1
    assert n == 14  # 7 linear layers in each of 2 decoder layers; lm_head stays fp
    assert torch.equal(logits(ours, ids()), logits(theirs, ids()))


# -- wrapping, gradients, training ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("api", ["get_peft_model", "add_adapter"])
def test_quantized_layers_get_wrapped_and_init_is_a_no_op(kind, api):
    model = quantize.quantize_model(tiny_llama(), kind)
    before = logits(model, ids())
    if api == "get_peft_model":
        model = lorakit.get_peft_model(model, lk_config())
    else:
        lorakit.add_adapter(model, lk_config())
    layers = [layer for _, layer in lorakit.lora_layers(model)]
    assert len(layers) == 14
    for layer in layers:
        assert type(layer.base_layer).__name__ == BNB_CLASS[kind]
        assert layer.lora_A["default"].dtype == torch.float32  # fp32 adapters on a quantized base
    assert torch.equal(logits(model, ids()), before)  # B = 0: the adapted model is the quantized base


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_only_adapters(kind):
    model = lorakit.get_peft_model(quantize.quantize_model(tiny_llama(), kind), lk_config())
    randomize_adapters(model)  # B != 0, so A gets a gradient too
    model.train()
    model(ids(), labels=ids()).loss.backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    for layer in [m for _, m in lorakit.lora_layers(model)]:
        assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_training_lowers_loss(kind):
    model = lorakit.get_peft_model(quantize.quantize_model(tiny_llama(), kind), lk_config(r=8))
    x = ids(3, (4, 16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_training_after_an_eval_pass_still_reaches_early_layers():
    """bitsandbytes repacks a Linear4bit for a bf16 CPU kernel at an eval no-grad forward; after that the
    base matmul has no backward. lorakit keeps wrapped 4-bit layers in the trainable layout."""
    model = lorakit.get_peft_model(quantize.quantize_model(tiny_llama(), "nf4"), lk_config())
    randomize_adapters(model)
    model.eval()
    with torch.no_grad():
        model(ids())
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not getattr(q_proj.base_layer.weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    out = model(ids(), labels=ids())
    out.loss.backward()
    # layer-0 q_proj's A gets its gradient through the base matmuls of every later layer
    assert q_proj.lora_A["default"].grad.abs().sum() > 0


def test_wrapping_undoes_an_earlier_cpu_repack():
    model = quantize.quantize_model(tiny_llama(), "nf4")
    layer = model.model.layers[0].self_attn.q_proj
    W = bnb_layers.dequantize_weight(layer).clone()
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(2, 64))
    if not getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    lorakit.add_adapter(model, lk_config())
    base = model.model.layers[0].self_attn.q_proj.base_layer
    assert not base.weight.quant_state.packing_format_for_cpu and base.weight.shape == (64 * 64 // 2, 1)
    # absmax went through bf16 while packed: the weight is back up to that rounding
    torch.testing.assert_close(bnb_layers.dequantize_weight(base), W, rtol=1e-2, atol=1e-3)


# -- parity with PEFT --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dora", [False, True])
def test_parity_with_peft_on_the_same_quantized_model(kind, dora):
    fp = tiny_llama()
    ours = quantize.quantize_model(copy.deepcopy(fp), kind)
    theirs = quantize.quantize_model(copy.deepcopy(fp), kind)
    torch.manual_seed(7)
    ours = lorakit.get_peft_model(ours, lk_config(use_dora=dora))
    torch.manual_seed(7)
    theirs = peft.get_peft_model(theirs, pf_config(use_dora=dora))
    assert type(theirs.base_model.model.model.layers[0].mlp.up_proj).__module__ == "peft.tuners.lora.bnb"
    ours_m = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():  # same seed, same init (DoRA: same magnitudes)
        if "lora_" in name:
            torch.testing.assert_close(ours_m[name.removesuffix(".weight")], p, rtol=0, atol=1e-6)
    randomize_adapters(theirs)
    assert copy_peft_adapters_into_lorakit(theirs, ours) == (28 + 14 * dora)
    diff = (logits(ours, ids()) - logits(theirs, ids())).abs().max().item()
    assert diff <= 1e-5, diff  # measured: 0.0 for LoRA, ~2e-7 for DoRA (norm computed without W + BA)


@pytest.mark.parametrize("model_dtype", [torch.bfloat16, torch.float32])
def test_parity_with_peft_bf16_compute_is_exact(model_dtype):
    """bf16 compute, fp32 adapters: x goes to the adapters in fp32 and their output is added in the dtype
    of the base output, as PEFT's bnb layers do (bf16 model: bf16; fp32 model: fp32)."""
    fp = tiny_llama(dtype=model_dtype)
    ours = quantize.quantize_model(copy.deepcopy(fp), "nf4", compute_dtype=torch.bfloat16)
    theirs = quantize.quantize_model(copy.deepcopy(fp), "nf4", compute_dtype=torch.bfloat16)
    ours, theirs = lorakit.get_peft_model(ours, lk_config()), peft.get_peft_model(theirs, pf_config())
    randomize_adapters(theirs)
    copy_peft_adapters_into_lorakit(theirs, ours)
    assert ours.base_model.model.lm_head.weight.dtype == model_dtype
    assert ours.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].dtype == torch.float32
    assert torch.equal(logits(ours, ids()), logits(theirs, ids()))


def test_print_trainable_parameters_matches_peft_on_4bit(capsys):
    ours = lorakit.get_peft_model(quantize.quantize_model(tiny_llama(), "nf4"), lk_config())
    theirs = peft.get_peft_model(quantize.quantize_model(tiny_llama(), "nf4"), pf_config())
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    line_ours, line_theirs = capsys.readouterr().out.strip().splitlines()
    assert line_ours == line_theirs
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


# -- adapters across precisions -----------------------------------------------------------------------------

def _dequantized_twin(qmodel: nn.Module) -> nn.Module:
    """The fp model whose weights are exactly the quantized model's dequantized weights."""
    return quantize.dequantize_model(copy.deepcopy(qmodel))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_adapter_loads_on_full_precision_base(kind, tmp_path):
    fp = tiny_llama()
    qmodel = quantize.quantize_model(copy.deepcopy(fp), kind)
    deq = _dequantized_twin(qmodel)
    trained = lorakit.get_peft_model(qmodel, lk_config())
    randomize_adapters(trained)
    trained.save_pretrained(tmp_path)
    q_logits = logits(trained, ids())
    # lorakit and PEFT load it on the fp base; on the dequantized base the logits are equal
    on_fp = lorakit.PeftModel.from_pretrained(copy.deepcopy(fp), tmp_path)
    on_fp_peft = peft.PeftModel.from_pretrained(copy.deepcopy(fp), tmp_path)
    on_deq = lorakit.PeftModel.from_pretrained(deq, tmp_path)
    assert (logits(on_fp, ids()) - logits(on_fp_peft, ids())).abs().max() <= 1e-5
    assert (logits(on_deq, ids()) - q_logits).abs().max() <= 1e-5
    # on the true fp base they differ by the quantisation error of the base, no more
    base_err = (logits(fp, ids()) - logits(_dequantized_twin(quantize.quantize_model(copy.deepcopy(fp), kind)),
                                           ids())).abs().max()
    adapted_err = (logits(on_fp, ids()) - q_logits).abs().max()
    assert adapted_err <= 2 * base_err + 1e-5, (adapted_err, base_err)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_fp_adapter_loads_on_quantized_base(kind, tmp_path):
    fp = tiny_llama()
    trained = peft.get_peft_model(copy.deepcopy(fp), pf_config())
    randomize_adapters(trained)
    trained.save_pretrained(tmp_path)
    qbase = quantize.quantize_model(copy.deepcopy(fp), kind)
    deq = _dequantized_twin(qbase)
    ours = lorakit.PeftModel.from_pretrained(qbase, tmp_path)
    theirs = peft.PeftModel.from_pretrained(quantize.quantize_model(copy.deepcopy(fp), kind), tmp_path)
    ref = lorakit.PeftModel.from_pretrained(deq, tmp_path)
    assert (logits(ours, ids()) - logits(theirs, ids())).abs().max() <= 1e-5
    assert (logits(ours, ids()) - logits(ref, ids())).abs().max() <= 1e-5
    assert all(not p.requires_grad for p in ours.parameters())  # loaded for inference


# -- merging ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,dora", [("nf4", False), ("fp4", True), ("int8", False)])
def test_merge_to_full_precision_equals_the_unmerged_qlora_model(kind, dora, tmp_path):
    model = lorakit.get_peft_model(quantize.quantize_model(tiny_llama(), kind), lk_config(use_dora=dora))
    randomize_adapters(model)
    before = logits(model, ids())
    merged = lorakit.merge_to_full_precision(model)
    assert not any(bnb_layers.is_quantized(m) or isinstance(m, LoraLayer) for m in merged.modules())
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert not hasattr(merged, "is_loaded_in_4bit") and not hasattr(merged, "is_loaded_in_8bit")
    diff = (logits(merged, ids()) - before).abs().max().item()
    assert diff <= 1e-5, diff  # measured ~1e-6: fp32 rounding only
    merged.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded.model.layers[0].self_attn.q_proj) is nn.Linear
    assert torch.equal(logits(reloaded, ids()), logits(merged, ids()))


def test_merge_to_full_precision_of_a_transformers_loaded_model(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    qmodel = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantize.quantization_config(),
                                              device_map="cpu")
    model = lorakit.get_peft_model(qmodel, lk_config())
    randomize_adapters(model)
    before = logits(model, ids())
    merged = lorakit.merge_to_full_precision(model, dtype=torch.bfloat16)
    assert not hasattr(merged.config, "quantization_config") and getattr(merged, "hf_quantizer", None) is None
    assert merged.lm_head.weight.dtype == torch.bfloat16
    merged.save_pretrained(tmp_path / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(reloaded.model.layers[1].mlp.down_proj) is nn.Linear
    assert (logits(reloaded.float(), ids()) - before).abs().max() < 0.1  # bf16 output dtype


@pytest.mark.parametrize("kind", KINDS)
def test_requantized_merge_reports_its_error(kind):
    model = lorakit.get_peft_model(quantize.quantize_model(tiny_llama(), "nf4"), lk_config())
    randomize_adapters(model)
    merged = lorakit.merge_to_full_precision(model)
    ref = logits(merged, ids())
    requantized, report = quantize.requantize_merged(merged, kind, sample=ids())
    assert report.kind == kind and report.layers == 14
    assert 0 < report.max_abs_error and 0 < report.rel_frobenius_error < (0.02 if kind == "int8" else 0.2)
    requantized.eval()  # the report measures the deployment path (int8: activations quantized too)
    with torch.no_grad():
        diff = (requantized(ids()).logits - ref).abs().max().item()
    assert report.logits_max_abs_diff == pytest.approx(diff, rel=1e-6)
    assert 0 < report.logits_rel_error < 1 and kind in str(report)
    assert sum(bnb_layers.is_quantized(m) for m in requantized.modules()) == 14


@pytest.mark.parametrize("kind", KINDS)
def test_merge_into_bnb_layer_applies_the_scaling(kind):
    """PEFT issue #3741 (lora_bias lost its scaling in bnb merges): lorakit's bnb merge must use s·BA."""
    base = quantize.quantize_linear(nn.Linear(128, 64), kind)
    layer = LoraLayer(base)
    layer.add("a", r=8, scaling=4.0)
    layer.active_adapters = ["a"]
    with torch.no_grad():
        layer.lora_B["a"].normal_(0, 0.05)
    W0 = bnb_layers.dequantize_weight(base).float()
    delta = layer.lora_B["a"] @ layer.lora_A["a"]  # (out, in), without s
    expected = bnb_layers.dequantize_weight(quantize.quantize_linear(_linear(W0 + 4.0 * delta), kind)).float()
    unscaled = bnb_layers.dequantize_weight(quantize.quantize_linear(_linear(W0 + delta), kind)).float()
    x = torch.randn(5, 128)
    unmerged = layer(x)
    with pytest.warns(UserWarning, match="re-quantises"):
        layer.merge(["a"])
    merged_W = bnb_layers.dequantize_weight(layer.base_layer).float()
    assert torch.equal(merged_W, expected)
    assert (merged_W - unscaled).abs().max() > 10 * (merged_W - expected).abs().max() + 1e-3
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ expected.T + base.bias, rtol=0, atol=1e-5)  # merged: base only
        rounding = (x.abs() @ (expected - W0 - 4.0 * delta).abs().T).max()  # bound from one rounding per weight
        assert 0 < (layer(x) - unmerged).abs().max() <= rounding + 1e-5


def _linear(W: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(W.shape[1], W.shape[0], bias=False)
    lin.weight.data.copy_(W)
    return lin


def test_dora_merge_into_4bit_base_and_cache_refresh():
    model = lorakit.get_peft_model(quantize.quantize_model(tiny_llama(), "nf4"), lk_config(use_dora=True))
    randomize_adapters(model)
    before = logits(model, ids())
    with pytest.warns(UserWarning):
        model.merge_adapter()
    after = logits(model, ids())  # merged layers skip the adapter; the base now holds Q(m·(W+sBA)/||·||)
    assert 0 < (after - before).abs().max() < 0.5
    for _, layer in lorakit.lora_layers(model):
        assert all(v._norm is None for v in layer.variants.values())  # a re-quantised base invalidates the cached norms


# -- memory ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,double_quant,expected", [
    ("nf4", True, 4 + 8 / 64 + 32 / (64 * 256)),  # 4.127
    ("fp4", False, 4 + 32 / 64),  # fp32 absmax per block: 4.5
    ("int8", True, 8 + 32 / 2048),  # one fp32 SCB per row of 2048 inputs
])
def test_weight_memory_report_bits_per_param(kind, double_quant, expected):
    torch.manual_seed(0)
    model = quantize.quantize_model(nn.Sequential(nn.Linear(2048, 1024, bias=False)), kind, double_quant=double_quant)
    report = quantize.weight_memory_report(model)
    assert report["quantized_layers"] == 1 and report["quantized_params"] == 2048 * 1024
    assert report["bits_per_param"] == pytest.approx(expected, abs=0.006)  # + code tables (1088 B / layer)
    assert report["by_kind"][kind]["bits_per_param"] == report["bits_per_param"]
    assert report["other_bytes"] == 0 and report["total_bytes"] == report["weight_bytes"] + report["state_bytes"]


def test_weight_memory_report_on_a_qlora_model():
    model = lorakit.get_peft_model(quantize.quantize_model(tiny_llama(), "nf4"), lk_config())
    report = quantize.weight_memory_report(model)
    theirs = peft.get_peft_model(quantize.quantize_model(tiny_llama(), "nf4"), pf_config())
    assert quantize.weight_memory_report(theirs) == report  # PEFT's wrappers are not counted as bnb layers
    assert report["quantized_layers"] == 14 and report["adapter_bytes"] == 4 * sum(
        p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert report["other_bytes"] == 4 * (2 * VOCAB * 64 + 5 * 64)  # embeddings, lm_head and norms in fp32
