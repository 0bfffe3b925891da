"""bitsandbytes 4/8-bit base layers (QLoRA's frozen base), registered as base kinds.

A Linear4bit stores its weight in 4 bits (NF4 or FP4, blocks of 64 weights sharing one absmax scale;
with "double quantisation" those scales are stored in 8 bits too); a Linear8bitLt (LLM.int8()) stores
one int8 row and one fp32 scale SCB per output row. For LoRA they are linear layers whose dense weight
must be dequantized to be read and re-quantised to be written:

    dequantize_weight(base)       dense (out, in) weight, as PEFT computes it
    requantize_weight(base, W)    write a dense weight back (rounds every weight again!)
    prepare_quantized_base(base)  keep bitsandbytes' trainable layout (see its docstring)
    is_quantized(module)          without importing bitsandbytes

Merging into such a base re-quantises W0 + s·BA, so the merged model differs from the unmerged one by
one rounding of every weight and unmerging does not give W0 back (PEFT warns the same); the exact way
is models.quantize / adapters.quantize.merge_to_full_precision. bitsandbytes is imported only when a
weight is read or written; without it those raise one LorakitError that says how to install it.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..errors import LorakitError
from .bases import BaseKind, register

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


def _bnb_class(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Is `module` one of bitsandbytes' classes `names` or a subclass (PEFT's wrappers share the names)?"""
    return any(c.__name__ in names and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def is_quantized(module: nn.Module) -> bool:
    """True for bitsandbytes' Linear4bit / Linear8bitLt (and subclasses), without importing bitsandbytes."""
    return _bnb_class(module, _QUANT_CLASSES)


def _is_4bit(module: nn.Module) -> bool:
    return _bnb_class(module, ("Linear4bit",))


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
                               "(.to('cpu') or .cuda()) or build it with lorakit.models.quantize.quantize_linear")
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
                  "use lorakit.merge_to_full_precision for an exact merge", UserWarning, stacklevel=4)
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



class _QuantizedLinear(BaseKind):
    """A bitsandbytes linear layer: dense weight in and out through (de)quantisation."""

    quantized = True

    def __init__(self, name: str, classes: tuple[str, ...]):
        self.name, self.classes = name, classes

    def matches(self, module: nn.Module) -> bool:
        return _bnb_class(module, self.classes)

    def weight(self, module: nn.Module) -> torch.Tensor:
        return dequantize_weight(module)

    def set_weight(self, module: nn.Module, W: torch.Tensor) -> None:
        requantize_weight(module, W)

    def prepare(self, module: nn.Module) -> None:
        prepare_quantized_base(module)


LINEAR_8BIT = register(_QuantizedLinear("bnb Linear8bitLt", ("Linear8bitLt",)))
LINEAR_4BIT = register(_QuantizedLinear("bnb Linear4bit", ("Linear4bit",)))
