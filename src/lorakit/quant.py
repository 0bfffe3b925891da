"""4/8-bit frozen base weights through bitsandbytes (QLoRA), and the way back to full precision.

QLoRA (Dettmers et al. 2023) trains LoRA adapters on a base whose linear weights are stored in 4 bits
(NF4 or FP4, blocks of 64 weights sharing one absmax scale; "double quantisation" stores those scales in
8 bits too) or in 8 bits (LLM.int8(): one int8 row and one fp32 scale SCB per output row). The adapters
stay in fp32; the base runs in `compute_dtype` (fp32 on CPU, bf16 on CUDA by default).

    quantization_config(kind)           -> transformers BitsAndBytesConfig for from_pretrained(...)
    quantize_model(model, kind)         quantize an fp model built in code, in place (not the output head)
    dequantize_weight(base)             dense (out, in) weight of a Linear4bit / Linear8bitLt
    requantize_weight(base, W)          write a dense weight back into a quantized layer (rounds!)
    merge_to_full_precision(model)      dequantize every quantized layer, merge the adapters exactly
    requantize_merged(model, kind)      quantize a merged model again and report the error it added
    weight_memory_report(model)         bytes and bits per parameter of the base weights

Merging into a quantized base (lorakit.merge / merge_and_unload on a QLoRA model) re-quantises
W0 + s·BA, so the merged model differs from the unmerged one by one rounding of every weight (4-bit:
up to half a quantisation step, about absmax/16 per weight) and unmerging does not give W0 back. PEFT
warns the same. To ship a QLoRA adapter merged, prefer merge_to_full_precision: exact up to fp32 rounding.

bitsandbytes is imported only when needed; without it every entry point raises one LorakitError that
says `pip install bitsandbytes`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LorakitError

KINDS = ("nf4", "fp4", "int8", "none")
INSTALL_HINT = "pip install bitsandbytes  (or: pip install 'lorakit[quant]')"
_QUANT_CLASSES = ("Linear4bit", "Linear8bitLt")  # and their subclasses (LinearNF4, LinearFP4)


def _bnb():
    """The bitsandbytes module, or a LorakitError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise LorakitError(f"4/8-bit quantisation needs bitsandbytes, which cannot be imported ({e}); "
                           f"install it: {INSTALL_HINT}") from None
    return bitsandbytes


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise LorakitError(f"unknown quantisation kind {kind!r}; use one of {list(KINDS)} "
                           f"(nf4 = QLoRA's 4-bit NormalFloat, fp4 = 4-bit float, int8 = LLM.int8())")


def default_compute_dtype(device: str | torch.device | None = None) -> torch.dtype:
    """fp32 on CPU, bf16 on CUDA (device None: CUDA if available)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _bnb_class(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Is `module` one of bitsandbytes' classes `names` or a subclass (PEFT's wrappers share the names)?"""
    return any(c.__name__ in names and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes' Linear4bit / Linear8bitLt (and subclasses), without importing bitsandbytes."""
    return _bnb_class(module, _QUANT_CLASSES)


def _is_4bit(module: nn.Module) -> bool:
    return _bnb_class(module, ("Linear4bit",))


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
    from .inject import _output_head_name

    head = _output_head_name(model)
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
    from .layers import LoraLayer  # layers.py imports this module at its top

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


# -- dense weights in and out -----------------------------------------------------------------------------

def prepare_quantized_base(base: nn.Module) -> None:
    """Keep a 4-bit layer in bitsandbytes' standard layout (called when LoRA wraps it).

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit at its first eval-mode forward without
    grad into a layout for its bf16 inference kernel: the matmul then runs in bf16 whatever compute_dtype
    says, and a later training forward neither returns gradients to earlier layers nor works with a bias.
    We undo a repack that already happened and switch it off for this layer.
    """
    if not _is_4bit(base):
        return
    _unpack_cpu(base)
    base.support_avx512bf16_for_cpu = False


def _unpack_cpu(base: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of a Linear4bit (absmax, kept in bf16 meanwhile, is re-quantised)."""
    qs = base.weight.quant_state
    if not getattr(qs, "packing_format_for_cpu", False):
        return
    import bitsandbytes.functional as bf

    base.weight.data, qs = bf._convert_weight_packed_for_cpu_inverse(base.weight.data, qs)
    base.weight.quant_state = base.quant_state = qs


def _int8_scales(base: nn.Module) -> torch.Tensor | None:
    """SCB (out,), fp32 scale per row; bitsandbytes moves it from the weight to base.state at first forward."""
    scb = getattr(base.weight, "SCB", None)
    return scb if scb is not None else getattr(base.state, "SCB", None)


def dequantize_weight(base: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (out, in) of a Linear4bit / Linear8bitLt.

    4-bit: bitsandbytes' dequantize_4bit with the layer's quant_state, in the dtype the weight was
    quantized from (fp32 on CPU, usually bf16 on CUDA); 8-bit: int8 row × SCB / 127 in fp32. Both as
    PEFT computes them. dtype: cast the result.
    """
    if not is_quantized(base):
        raise LorakitError(f"dequantize_weight takes a bitsandbytes Linear4bit or Linear8bitLt, got "
                           f"{type(base).__name__}")
    bnb = _bnb()
    weight = base.weight
    if _is_4bit(base):
        if weight.quant_state is None:
            raise LorakitError("this Linear4bit is not quantized yet (no quant_state); move it to a device "
                               "(.to('cpu') or .cuda()) or build it with lorakit.quant.quantize_linear")
        _unpack_cpu(base)
        W = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)  # (out, in)
    elif weight.dtype != torch.int8:
        W = weight.data  # has_fp16_weights=True: bitsandbytes keeps the dense weight
    else:
        scb = _int8_scales(base)
        if scb is None:
            raise LorakitError("this Linear8bitLt has int8 weights but no SCB scales; it was not quantized "
                               "by bitsandbytes (load it with quantization_config or quantize_linear)")
        W = bnb.functional.int8_vectorwise_dequant(weight.data, scb)  # (out, in) fp32
    return W.to(dtype) if dtype is not None else W


def requantize_weight(base: nn.Module, W: torch.Tensor) -> None:
    """Write dense W (out, in) into a quantized layer, re-quantising it with the layer's own settings.

    Rounds every weight again (see the module docstring): a merge into a quantized base is not exact and
    an unmerge does not restore W0. For an exact merge use merge_to_full_precision.
    """
    if not is_quantized(base):
        raise LorakitError(f"requantize_weight takes a bitsandbytes Linear4bit or Linear8bitLt, got "
                           f"{type(base).__name__}")
    if tuple(W.shape) != (base.out_features, base.in_features):
        raise LorakitError(f"requantize_weight: W has shape {tuple(W.shape)}, the layer needs "
                           f"{(base.out_features, base.in_features)} (out, in)")
    warnings.warn("merging into a 4/8-bit base re-quantises the weights and rounds them (as PEFT's merge does); "
                  "use lorakit.quant.merge_to_full_precision for an exact merge", UserWarning, stacklevel=3)
    bnb, old = _bnb(), base.weight
    W = W.detach()
    if _is_4bit(base):
        _unpack_cpu(base)
        old = base.weight
        base.weight = bnb.nn.Params4bit(
            W.to(old.quant_state.dtype).contiguous(), requires_grad=False, blocksize=old.blocksize,
            compress_statistics=old.compress_statistics, quant_type=old.quant_type,
            quant_storage=old.quant_storage, module=base).to(old.device)
    elif old.dtype != torch.int8:
        old.data.copy_(W.to(old.dtype))
    else:
        base.weight = bnb.nn.Int8Params(W.float().cpu().contiguous(), requires_grad=False,
                                        has_fp16_weights=False).to(old.device)
        base.state.CB, base.state.SCB = None, None  # the next forward takes CB/SCB from the new weight
        base.state.reset_grads()


# -- full precision again -----------------------------------------------------------------------------------

def _dense_linear(base: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain nn.Linear with the dequantized weight of `base` (bias cast to dtype)."""
    W = dequantize_weight(base, dtype)
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
    """Replace every Linear4bit / Linear8bitLt (also inside LoRA layers) by an nn.Linear in `dtype`."""
    for name, mod in list(model.named_modules()):
        if is_quantized(mod):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _dense_linear(mod, dtype))
            if hasattr(parent, "_dora_cache"):
                parent._dora_cache.clear()
    _forget_quantization(model)
    return model


def merge_to_full_precision(model: nn.Module, dtype: torch.dtype = torch.float32, safe_merge: bool = False,
                            adapter_names: list[str] | None = None) -> nn.Module:
    """Dequantize the base, merge the adapters exactly, return a plain model in `dtype` (no lorakit modules).

    The merge happens in fp32 (W = dequant(Wq) + s·BA, DoRA likewise), then the whole model is cast to
    dtype. Accepts a plain model with lorakit adapters or a lorakit PeftModel (its base model is returned).
    The result equals the unmerged QLoRA model up to fp32 rounding; save it with save_pretrained. Use
    requantize_merged on it for a quantized deployment, and read the error that adds.
    """
    from . import adapters

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dequantize_model(base, torch.float32)
    if any(True for _ in adapters.lora_layers(base)):
        adapters.merge_and_unload(base, safe_merge=safe_merge, adapter_names=adapter_names)
    base.to(dtype)
    if getattr(base, "config", None) is not None and hasattr(base.config, "dtype"):
        base.config.dtype = dtype
    return base


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
