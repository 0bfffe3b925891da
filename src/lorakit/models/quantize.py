"""Quantized base models (QLoRA): load or build a 4/8-bit base, and measure what quantising costs.

QLoRA (Dettmers et al. 2023) trains LoRA adapters on a base whose linear weights are stored in 4 bits
(NF4 or FP4) or in 8 bits (LLM.int8()), through bitsandbytes; the layer-level reading and writing of
those weights is layers/bnb.py. The adapters stay in fp32; the base runs in `compute_dtype` (fp32 on
CPU, bf16 on CUDA by default).

    QUANT_KINDS                         the kinds every config key and command line accepts
    quantization_config(kind)           -> transformers BitsAndBytesConfig for from_pretrained(...)
    quantize_model(model, kind)         quantize an fp model built in code, in place (not the output head)
    dequantize_model(model)             every quantized linear (bitsandbytes, GPTQ, AWQ) back to an nn.Linear
    requantize_merged(model, kind)      quantize a merged model again and report the error it added
    weight_memory_report(model)         bytes and bits per parameter of the base weights
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LorakitError
from ..layers import LoraLayer
from ..layers.bnb import _bnb, _int8_scales, _is_4bit, _unpack_cpu, dequantize_weight, is_quantized, \
    prepare_quantized_base
from ..layers.gptq import dequantize_weight as dequantize_gptq, is_gptq_layer
from .heads import output_head_name

QUANT_KINDS = ("nf4", "fp4", "int8", "none")

def _check_kind(kind: str) -> None:
    if kind not in QUANT_KINDS:
        raise LorakitError(f"unknown quantisation kind {kind!r}; use one of {list(QUANT_KINDS)} "
                           f"(nf4 = QLoRA's 4-bit NormalFloat, fp4 = 4-bit float, int8 = LLM.int8())")


def default_compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA (device None: CUDA if available)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# -- configs and quantizing a model -------------------------------------------------------------------------

def quantization_config(kind: str = "nf4", compute_dtype: torch.dtype | None = None, double_quant: bool = True,
                        device: str | torch.device | None = None, skip_modules: list[str] | None = None):
    """A transformers BitsAndBytesConfig for `from_pretrained(..., quantization_config=...)`, or None for 'none'.

    compute_dtype: the dtype the 4-bit matmul runs in (default fp32 on CPU, bf16 on CUDA).
    double_quant: also quantise the per-block absmax scales to 8 bits (QLoRA's default; 4-bit kinds only).
    """
    _check_kind(kind)
    if kind == "none":
        return None
    _bnb()
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=compute_dtype or default_compute_dtype(device),
                              llm_int8_skip_modules=skip_modules)


def quantize_linear(linear: nn.Linear, kind: str = "nf4", compute_dtype: torch.dtype | None = None,
                    double_quant: bool = True, blocksize: int = 64, threshold: float = 6.0) -> nn.Module:
    """A bitsandbytes Linear4bit / Linear8bitLt holding `linear`'s weight quantized (bias kept as is).

    Built like transformers' loader builds it (same class, same Params4bit / Int8Params settings), on the
    device of `linear`. threshold: LLM.int8()'s outlier threshold for activations (int8 only).
    """
    _check_kind(kind)
    if kind == "none" or type(linear) is not nn.Linear:
        raise LorakitError(f"cannot quantize {type(linear).__name__} to {kind!r}: quantize_linear takes a "
                           f"plain nn.Linear and kind nf4/fp4/int8")
    bnb = _bnb()
    W, device, has_bias = linear.weight.detach(), linear.weight.device, linear.bias is not None
    if kind == "int8":
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, has_bias, has_fp16_weights=False,
                                threshold=threshold, device="meta")
        q.weight = bnb.nn.Int8Params(W.cpu().contiguous(), requires_grad=False, has_fp16_weights=False).to(device)
    else:
        dtype = compute_dtype or default_compute_dtype(device)
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, has_bias, compute_dtype=dtype,
                              compress_statistics=double_quant, quant_type=kind, device="meta")
        q.weight = bnb.nn.Params4bit(W.contiguous(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=kind, module=q).to(device)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    q.source_cls = nn.Linear  # as transformers marks the layers it converts
    q.train(linear.training)
    return q


def _quantize_targets(model: nn.Module, skip_modules: list[str] | None) -> list[str]:
    """Plain nn.Linear modules to quantize: all but the output head and `skip_modules` (as transformers)."""
    head = output_head_name(model)
    skip = set(skip_modules or [])
    names = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or name == head or ".lora_" in name:
            continue
        if any(name == s or name.endswith(f".{s}") or name.startswith(f"{s}.") for s in skip):
            continue
        names.append(name)
    return names


def quantize_model(model: nn.Module, kind: str = "nf4", compute_dtype: torch.dtype | None = None,
                   double_quant: bool = True, skip_modules: list[str] | None = None, blocksize: int = 64,
                   threshold: float = 6.0) -> nn.Module:
    """Quantize an already-loaded fp model's linear layers in place (not the output head); returns it.

    For models built in code (tests, benchmarks). A model from the Hub is better loaded quantized:
    from_pretrained(..., quantization_config=quantization_config(kind)) never holds the fp weights.
    Sets model.is_loaded_in_4bit / is_loaded_in_8bit like transformers, so PEFT sees a quantized model.
    """
    _check_kind(kind)
    if kind == "none":
        return model
    if any(isinstance(m, LoraLayer) for m in model.modules()):
        raise LorakitError("quantize_model must run before adapters are added (the model already has LoRA "
                           "layers); quantize the base first, then add_adapter / get_peft_model")
    _quantize_modules(model, _quantize_targets(model, skip_modules), kind, compute_dtype, double_quant,
                      blocksize, threshold)
    setattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    return model


def _quantize_modules(model: nn.Module, names: list[str], kind: str, compute_dtype, double_quant: bool,
                      blocksize: int, threshold: float, on_layer=None) -> None:
    """Replace each named nn.Linear by its quantized twin; on_layer(W_fp, q) sees each pair (for reports)."""
    if not names:
        raise LorakitError(f"{type(model).__name__} has no plain nn.Linear layer to quantize (output head "
                           f"excluded); quantize_model supports nn.Linear only")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        q = quantize_linear(linear, kind, compute_dtype, double_quant, blocksize, threshold)
        if on_layer is not None:
            on_layer(linear.weight.detach(), q)
        setattr(parent, child, q)


# -- full precision again -----------------------------------------------------------------------------------

def _dense_linear(base: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear with the dequantized weight of `base` (bias cast to dtype)."""
    W = dequantize_gptq(base, dtype) if is_gptq_layer(base) else dequantize_weight(base, dtype)
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    lin.weight = nn.Parameter(W.contiguous(), requires_grad=False)
    if base.bias is not None:
        lin.bias = nn.Parameter(base.bias.detach().to(dtype).clone(), requires_grad=False)
    lin.train(base.training)
    return lin


def _forget_quantization(model: nn.Module) -> None:
    """Drop transformers' quantization bookkeeping, so save_pretrained writes a plain fp model."""
    for attr in ("hf_quantizer", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        model.__dict__.pop(attr, None)
    if "is_quantized" in model.__dict__:
        model.is_quantized = False
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    if config is not None and hasattr(config, "_is_quantized"):
        config._is_quantized = False


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace every Linear4bit / Linear8bitLt / GPTQ / AWQ linear (also inside LoRA layers) by an nn.Linear."""
    for name, mod in list(model.named_modules()):
        if is_quantized(mod) or is_gptq_layer(mod):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            dense = _dense_linear(mod, dtype)
            if isinstance(parent, LoraLayer) and child == "base_layer":
                parent.replace_base(dense)  # the layer re-reads its base kind and drops what it cached
            else:
                setattr(parent, child, dense)
    _forget_quantization(model)
    return model


# -- error and memory reports -------------------------------------------------------------------------------

@dataclass
class QuantReport:
    """What re-quantising a full-precision model cost, measured on its weights and (optionally) its logits."""

    kind: str
    layers: int
    max_abs_error: float  # max |dequant(Q(W)) - W| over all quantized weights
    rel_frobenius_error: float  # sqrt(Σ ||dequant(Q(W)) - W||²) / sqrt(Σ ||W||²) over all layers
    logits_max_abs_diff: float | None = None  # on the sample: quantized vs full-precision model
    logits_rel_error: float | None = None  # ||Δlogits|| / ||logits|| on the sample

    def __str__(self) -> str:
        text = (f"{self.kind}: {self.layers} layers, weight error max {self.max_abs_error:.3g}, "
                f"relative Frobenius {self.rel_frobenius_error:.3g}")
        if self.logits_max_abs_diff is not None:
            text += f"; logits max |diff| {self.logits_max_abs_diff:.3g} (relative {self.logits_rel_error:.3g})"
        return text


@torch.no_grad()
def _logits(model: nn.Module, sample) -> torch.Tensor:
    out = model(**sample) if isinstance(sample, dict) else model(sample)
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.no_grad()
def requantize_merged(model: nn.Module, kind: str = "nf4", sample=None, compute_dtype: torch.dtype | None = None,
                      double_quant: bool = True, skip_modules: list[str] | None = None) -> tuple[nn.Module, QuantReport]:
    """Quantize a full-precision (e.g. merged) model in place and report the error that introduced.

    sample: input ids (or a dict of model kwargs) to compare logits before and after, in eval mode.
    Returns (the quantized model, QuantReport).
    """
    _check_kind(kind)
    if kind == "none":
        raise LorakitError("requantize_merged needs kind nf4, fp4 or int8 ('none' keeps the merged model as is)")
    was_training = model.training
    model.eval()
    ref = _logits(model, sample) if sample is not None else None
    stats = {"max": 0.0, "err_sq": 0.0, "ref_sq": 0.0, "layers": 0}

    def measure(W: torch.Tensor, q: nn.Module) -> None:
        diff = dequantize_weight(q, torch.float32) - W.float()  # (out, in)
        stats["max"] = max(stats["max"], diff.abs().max().item())
        stats["err_sq"] += diff.pow(2).sum().item()
        stats["ref_sq"] += W.float().pow(2).sum().item()
        stats["layers"] += 1

    _quantize_modules(model, _quantize_targets(model, skip_modules), kind, compute_dtype, double_quant, 64, 6.0,
                      on_layer=measure)
    for mod in model.modules():
        prepare_quantized_base(mod)  # measure the compute_dtype path, not bitsandbytes' bf16 CPU kernel
    setattr(model, "is_loaded_in_8bit" if kind == "int8" else "is_loaded_in_4bit", True)
    report = QuantReport(kind, stats["layers"], stats["max"], (stats["err_sq"] / max(stats["ref_sq"], 1e-30)) ** 0.5)
    if ref is not None:
        diff = _logits(model, sample) - ref
        report.logits_max_abs_diff = diff.abs().max().item()
        report.logits_rel_error = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
    model.train(was_training)
    return model, report


def _layer_bytes(base: nn.Module) -> tuple[str, int, int, int]:
    """(kind, parameters, weight bytes, quantisation-state bytes) of one quantized layer."""
    w = base.weight
    if _is_4bit(base):
        _unpack_cpu(base)
        qs = w.quant_state
        state = [qs.absmax, qs.code] + ([qs.offset, qs.state2.absmax, qs.state2.code] if qs.nested else [])
        return qs.quant_type, qs.shape.numel(), w.data.nbytes, sum(t.nbytes for t in state if t is not None)
    scb = _int8_scales(base)
    return "int8", w.numel(), w.data.nbytes, scb.nbytes if scb is not None else 0


def weight_memory_report(model: nn.Module) -> dict:
    """Bytes and bits per parameter of the base weights.

    For the quantized linear layers: packed weight bytes plus quantisation state (4-bit: absmax per block
    of 64, with double quantisation the 8-bit absmax plus its fp32 scales per 256 blocks and both code
    tables; int8: one fp32 SCB per row). NF4 with double quantisation is 4 + 8/64 + 32/(64·256) ≈ 4.127 bits
    per parameter plus the code tables (1088 bytes a layer). Other parameters (embeddings, norms, output
    head, adapters) are counted at their dtype.
    """
    out = {"quantized_layers": 0, "quantized_params": 0, "weight_bytes": 0, "state_bytes": 0, "by_kind": {}}
    seen = set()
    for mod in model.modules():
        if not is_quantized(mod):
            continue
        kind, n, wb, sb = _layer_bytes(mod)
        seen.add(id(mod.weight))
        row = out["by_kind"].setdefault(kind, {"layers": 0, "params": 0, "bytes": 0})
        row["layers"], row["params"], row["bytes"] = row["layers"] + 1, row["params"] + n, row["bytes"] + wb + sb
        out["quantized_layers"] += 1
        out["quantized_params"] += n
        out["weight_bytes"] += wb
        out["state_bytes"] += sb
    for row in out["by_kind"].values():
        row["bits_per_param"] = 8 * row["bytes"] / row["params"]
    q_bytes = out["weight_bytes"] + out["state_bytes"]
    out["bits_per_param"] = 8 * q_bytes / out["quantized_params"] if out["quantized_params"] else None
    adapter = {id(p): p for name, p in model.named_parameters() if ".lora_" in name}
    out["adapter_bytes"] = sum(p.nbytes for p in adapter.values())
    out["other_bytes"] = sum(p.nbytes for p in model.parameters() if id(p) not in seen and id(p) not in adapter)
    out["total_bytes"] = q_bytes + out["adapter_bytes"] + out["other_bytes"]
    return out
