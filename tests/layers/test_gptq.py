"""GPTQ and AWQ bases (gptqmodel's quantized linears, loaded by transformers): train, save, PEFT, merge.

The GPTQ base is quantized by transformers itself (GPTQConfig with a tokenized calibration set, through
optimum and gptqmodel, on CPU); the AWQ base is written with gptqmodel's own AWQ packing (AwqTorchLinear
.pack of round-to-nearest codes, AWQ's GEMM layout), since transformers only loads AWQ checkpoints.
Both load back through from_pretrained with gptqmodel's torch kernels (backend "torch" / "torch_awq")
unless a test says otherwise. gptqmodel's JIT pack extension and its torch.compile of the dequantizer
are switched off here (minutes of C++ compilation on a 2-core CPU; same values).
"""

from __future__ import annotations

import builtins
import importlib.util
import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import LorakitError
from lorakit.layers import gptq as gptq_layers
from lorakit.layers import kind_of
from lorakit.models.quantize import dequantize_model

from conftest import run_config

HAVE_GPTQ = all(importlib.util.find_spec(m) is not None for m in ("gptqmodel", "optimum", "peft"))
needs_gptq = pytest.mark.skipif(not HAVE_GPTQ, reason="needs gptqmodel + optimum: pip install 'lorakit[gptq]'")
VOCAB, GROUP = 96, 32
TARGETS = ["q_proj", "v_proj", "down_proj"]
KERNEL = {"gptq": "TorchLinear", "awq": "AwqTorchLinear"}
PEFT_LAYER = {"gptq": "GPTQLoraLinear", "awq": "AwqLoraLinear"}


@pytest.fixture(autouse=True, scope="module")
def quiet_cpu():
    """One thread (tiny matmuls on a shared CPU), no pack extension build, no torch.compile."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    # dynamo's own patch, not monkeypatch: undoing a setattr on torch._dynamo.config deletes (hides) the
    # option, and every later torch.compile in the process then fails ("config.disable does not exist")
    with pytest.MonkeyPatch.context() as mp, torch._dynamo.config.patch(disable=True):
        mp.setenv("GPTQMODEL_DISABLE_PACK_EXT", "1")
        yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0):
    """4 kv heads: gptqmodel packs output features in multiples of 32 (k_proj: 4 heads x 8 = 32)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def ids(seed: int, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def write_gptq(path) -> None:
    """GPTQ 4-bit by transformers + optimum + gptqmodel, calibrated on 8 random token sequences."""
    from transformers import AutoModelForCausalLM, GPTQConfig
    tiny_llama().save_pretrained(path / "fp")
    data = [{"input_ids": ids(i, (1, 32)), "attention_mask": torch.ones(1, 32, dtype=torch.long)} for i in range(8)]
    cfg = GPTQConfig(bits=4, group_size=GROUP, dataset=data, desc_act=False, sym=True, backend="torch")
    model = AutoModelForCausalLM.from_pretrained(path / "fp", quantization_config=cfg, dtype=torch.bfloat16)
    model.config.quantization_config.dataset = None  # tensors: not JSON
    model.save_pretrained(path / "gptq")


def write_awq(path) -> None:
    """AWQ 4-bit (zero point, GEMM layout) packed by gptqmodel's AwqTorchLinear from round-to-nearest codes."""
    from gptqmodel.nn_modules.qlinear.torch_awq import AwqTorchLinear
    model = tiny_llama()
    for name, lin in list(model.named_modules()):
        if not isinstance(lin, nn.Linear) or name == "lm_head":
            continue
        out, n_in = lin.weight.shape
        W = lin.weight.detach().reshape(out, n_in // GROUP, GROUP)  # (out, groups, GROUP)
        lo, hi = W.amin(-1), W.amax(-1)
        scales = ((hi - lo).clamp(min=1e-5) / 15).half().float()  # (out, groups)
        zeros = (-torch.round(lo / scales)).clamp(0, 15)
        codes = (torch.round(W / scales[..., None]) + zeros[..., None]).clamp(0, 15)
        lin.weight.data = ((codes - zeros[..., None]) * scales[..., None]).reshape(out, n_in)  # exactly packable
        q = AwqTorchLinear(bits=4, group_size=GROUP, sym=False, desc_act=False, in_features=n_in,
                           out_features=out, bias=False)
        q.pack(lin, scales.half(), zeros.half())
        model.set_submodule(name, q)
    model.config.quantization_config = {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                                        "zero_point": True, "version": "gemm"}
    model.save_pretrained(path / "awq")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    path = tmp_path_factory.mktemp("gptq")
    write_gptq(path)
    write_awq(path)
    return path


def load(checkpoints, method: str, dtype=torch.float32, backend: str | None = None):
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig
    if method == "gptq":
        config = GPTQConfig(bits=4, backend=backend or "torch")
    else:
        config = AwqConfig(bits=4, group_size=GROUP, backend=backend or "torch_awq")
    return AutoModelForCausalLM.from_pretrained(checkpoints / method, dtype=dtype, quantization_config=config)


def add(model, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw))


def train(model, steps: int = 10) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, losses = ids(7, (4, 16)), []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def logits(model, x) -> torch.Tensor:
    return model(input_ids=x).logits.float()


@needs_gptq
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantized_layers_are_base_kinds_with_the_kernels_weight(checkpoints, method):
    """The registry finds the kernel; the dequantized weight is the one its forward multiplies by."""
    model = load(checkpoints, method)
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == KERNEL[method]
    assert kind_of(layer) is {"gptq": gptq_layers.GPTQ_LINEAR, "awq": gptq_layers.AWQ_LINEAR}[method]
    W = gptq_layers.dequantize_weight(layer, torch.float32)  # (out, in)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = layer(x).float()
    tol = 1e-5 if method == "gptq" else 2e-3  # gptqmodel's AWQ torch kernel computes fp32 inputs in fp16
    torch.testing.assert_close(y, x @ W.T, atol=tol, rtol=0)
    from safetensors.torch import load_file
    W0 = load_file(checkpoints / "fp" / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    assert ((W - W0).norm() / W0.norm()).item() < 0.15  # 4-bit, groups of 32: a close copy, not the same


@needs_gptq
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_train_save_and_load_in_peft_on_the_same_base(checkpoints, tmp_path, method, dtype):
    import peft
    model = add(load(checkpoints, method, dtype))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    losses = train(model)
    assert losses[-1] < losses[0] - 0.05, losses
    x = ids(3)
    ours = logits(model, x)
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    theirs_model = peft.PeftModel.from_pretrained(load(checkpoints, method, dtype), tmp_path / "adapter").eval()
    wrapped = theirs_model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(wrapped).__name__ == PEFT_LAYER[method]
    theirs = logits(theirs_model, x)
    assert (theirs - ours).abs().max().item() <= 1e-5
    assert (logits(load(checkpoints, method, dtype), x) - ours).abs().max().item() > 1e-3  # the adapter counts


@needs_gptq
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_merge_into_a_dequantized_full_precision_base(checkpoints, tmp_path, method):
    from transformers import AutoModelForCausalLM
    model = add(load(checkpoints, method), init_lora_weights=False)  # random B: a visible delta
    x = ids(4)
    unmerged = logits(model, x)
    reference = logits(dequantize_model(add(load(checkpoints, method), init_lora_weights=False)), x)
    merged = lorakit.merge_to_full_precision(model)
    assert not any(gptq_layers.is_gptq_layer(m) or isinstance(m, lorakit.LoraLayer) for m in merged.modules())
    assert merged.dtype == torch.float32 and not hasattr(merged.config, "quantization_config")
    got = logits(merged, x)
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=0)  # the merge is exact
    tol = 1e-5 if method == "gptq" else 2e-3  # the quantized AWQ forward ran in fp16
    torch.testing.assert_close(got, unmerged, atol=tol, rtol=0)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(again, x), got, atol=1e-6, rtol=0)


@needs_gptq
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_in_place_merge_is_refused_with_the_way_out(checkpoints, method):
    model = add(load(checkpoints, method), init_lora_weights=False)
    with pytest.raises(LorakitError, match="merge_to_full_precision"):
        lorakit.merge_and_unload(model)


@needs_gptq
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_default_cpu_kernel_stays_trainable_after_an_inference_forward(checkpoints, method):
    """gptqmodel's default CPU kernel (aten int4) repacks at its first no-grad eval forward, after which a
    layer's output has no grad_fn: an un-adapted k_proj would cut the gradient to the adapters before it."""
    model = add(load(checkpoints, method, torch.bfloat16, backend="auto_trainable"))  # what load_model asks for
    attn = model.model.layers[0].self_attn
    assert type(attn.q_proj.base_layer).__name__ in ("TorchAtenLinear", "TorchAtenAwqLinear")
    x = ids(5)
    before = logits(model, x)  # would repack every kernel for inference
    assert attn.q_proj.base_layer.linear_mode == attn.k_proj.linear_mode == "train"
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 12 and all(g is not None for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)  # layer 0's adapters too
    model.eval()
    merged = logits(lorakit.merge_to_full_precision(model), x)
    assert (merged - before).abs().max().item() < 0.05  # bf16 base vs fp32 merged copy, zero-init adapter


@needs_gptq
def test_a_kernel_repacked_before_the_adapter_is_refused(checkpoints):
    model = load(checkpoints, "gptq", torch.bfloat16, backend="auto_trainable")
    logits(model, ids(6))  # aten's int4 layout from now on
    with pytest.raises(LorakitError, match="backend='torch'"):
        add(model)


@needs_gptq
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_the_loader_asks_for_a_trainable_kernel(checkpoints, method):
    """gptqmodel's "auto" picks an inference-only AVX-512 kernel on CPUs with AVX512-BF16 (training then
    failed inside gptqmodel on such machines only); lorakit's loader asks for "auto_trainable" and keeps
    the checkpoint's own settings."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from lorakit.models.load import _trainable_kernel
    kw = _trainable_kernel(AutoConfig.from_pretrained(checkpoints / method))
    assert kw["quantization_config"].backend == "auto_trainable"
    model = AutoModelForCausalLM.from_pretrained(checkpoints / method, dtype=torch.bfloat16, **kw)
    layers = [m for m in model.modules() if gptq_layers.is_gptq_layer(m)]
    assert layers and all(getattr(type(m), "SUPPORTS_TRAINING", True) is not False for m in layers)
    assert all(m.group_size == GROUP and m.bits == 4 for m in layers)
    model = add(model)
    train(model, steps=2)  # trains
    assert _trainable_kernel(AutoConfig.from_pretrained(checkpoints / "fp")) == {}  # not quantized: nothing asked


@needs_gptq
def test_training_an_inference_only_kernel_is_refused_with_the_way_out(checkpoints, monkeypatch):
    from lorakit.train.loop import run
    from lorakit.train.state import TrainState
    model = add(load(checkpoints, "gptq"))
    layer = next(m for m in model.modules() if gptq_layers.is_gptq_layer(m))
    monkeypatch.setattr(type(layer), "SUPPORTS_TRAINING", False)  # as gptqmodel's AVX-512 kernels declare
    with pytest.raises(LorakitError, match="inference-only GPTQ kernel.*backend='auto_trainable'"):
        gptq_layers.refuse_inference_only(model)
    with pytest.raises(LorakitError, match="inference-only"):
        run(model, None, None, iter(()), steps=1, state=TrainState())


@needs_gptq
@pytest.mark.slow  # ~20 s: a 49k-token vocabulary through GPTQ calibration and 12 steps
def test_a_gptq_checkpoint_trains_through_the_run_config(tmp_path, smol_tokenizer, data_file):
    """`model=<GPTQ folder>` and nothing else: transformers reads quant_method from config.json and picks
    gptqmodel's default CPU kernel; the run trains, loss falls, the adapter folder is PEFT's."""
    import peft
    from transformers import AutoModelForCausalLM, GPTQConfig, LlamaConfig, LlamaForCausalLM
    from lorakit.train import train as run_training
    torch.manual_seed(0)
    tok = smol_tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    calib = [dict(tok(t, return_tensors="pt")) for t in ["Shout cat CAT!", "the sun is in the sky", "a red map"]]
    quant = GPTQConfig(bits=4, group_size=GROUP, dataset=calib, backend="torch")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=quant, dtype=torch.bfloat16)
    model.config.quantization_config.dataset = None
    model.save_pretrained(tmp_path / "gptq")
    tok.save_pretrained(tmp_path / "gptq")
    result = run_training(run_config(tmp_path / "gptq", data_file, tmp_path / "run", "train.max_steps=12"),
                          progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert result.steps == 12 and sum(losses[-3:]) / 3 < losses[0] - 0.1, losses
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "run")
    assert type(peft_model.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "GPTQLoraLinear"


class BaseQuantLinear(nn.Module):
    """Stands in for gptqmodel's class (same name and module) to test the import error alone."""

    in_features = out_features = 8


BaseQuantLinear.__module__ = "gptqmodel.nn_modules.qlinear"


def test_missing_gptqmodel_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_gptqmodel(name, *args, **kwargs):
        if name.split(".")[0] == "gptqmodel":
            raise ImportError("No module named 'gptqmodel'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gptqmodel)
    layer = BaseQuantLinear()
    assert gptq_layers.is_gptq_layer(layer) and gptq_layers.quant_method(layer) == "gptq"
    assert not gptq_layers.is_gptq_layer(nn.Linear(8, 8))
    with pytest.raises(LorakitError, match=r"lorakit\[gptq\]"):
        gptq_layers.dequantize_weight(layer)
    with pytest.raises(LorakitError, match="merge_to_full_precision"):
        kind_of(layer).set_weight(layer, torch.zeros(8, 8))
