"""GPTQ and AWQ base layers (gptqmodel's quantized linears, as transformers loads them), as base kinds.

transformers loads a checkpoint whose config has `quantization_config.quant_method` "gptq" or "awq"
through gptqmodel (GPTQ via optimum), which swaps every quantized nn.Linear for one of its kernels
(TorchLinear, TorchAtenLinear, AwqTorchLinear, Marlin, ...; all subclasses of its BaseQuantLinear).
Each stores int codes packed in int32 words (qweight (in·bits/32, out) for GPTQ, (in, out·bits/32) for
AWQ), one fp16/bf16 scale and one int zero point per group of `group_size` inputs and output, and
computes W[o, i] = scale[g(i), o] · (q[i, o] - zero[g(i), o]). For LoRA such a layer is a linear layer:

    is_gptq_layer(module)         any gptqmodel quantized linear, without importing gptqmodel
    quant_method(module)          "gptq" or "awq"
    dequantize_weight(base)       the dense (out, in) weight, by gptqmodel's own unpacking
    prepare_gptq_base(base)       keep a CPU kernel in its trainable layout (see its docstring)
    keep_trainable(model)         the same for every such layer of a model, adapted or not

The forward runs through the quantized module and the adapters stay fp32; their output is added as
PEFT adds it (GPTQ: in fp32, the sum cast to the base's dtype; AWQ: cast to it first). Writing a dense
weight back would need GPTQ's calibration (re-quantising by rounding is not GPTQ), so set_weight
refuses, as PEFT does not merge into GPTQ or AWQ layers either; models.quantize.dequantize_model /
merge_to_full_precision give the exact merge into a full-precision copy. gptqmodel is imported only
when a weight is read.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LorakitError
from .bases import BaseKind, register

INSTALL_HINT = {"gptq": "pip install 'lorakit[gptq]'  (gptqmodel and optimum, what transformers loads GPTQ with)",
                "awq": "pip install 'lorakit[awq]'  (gptqmodel, what transformers loads AWQ with)"}


def _gptqmodel_class(module: nn.Module, names: tuple[str, ...]) -> bool:
    """Is `module` one of gptqmodel's classes `names` or a subclass (PEFT's wrappers are not)?"""
    return any(c.__name__ in names and c.__module__.startswith("gptqmodel") for c in type(module).__mro__)


def is_gptq_layer(module: nn.Module) -> bool:
    """True for any gptqmodel quantized linear (GPTQ or AWQ kernel), without importing gptqmodel."""
    return _gptqmodel_class(module, ("BaseQuantLinear",))


def quant_method(module: nn.Module) -> str:
    """"awq" for gptqmodel's AWQ kernels (AWQuantLinear), "gptq" for the others."""
    return "awq" if _gptqmodel_class(module, ("AWQuantLinear",)) else "gptq"


def _gptqmodel(method: str):
    """The gptqmodel module, or a LorakitError that names the pip extra for `method` ("gptq" | "awq")."""
    try:
        import gptqmodel
    except ImportError as e:
        raise LorakitError(f"{method.upper()} base layers need gptqmodel, which cannot be imported ({e}); "
                           f"install it: {INSTALL_HINT[method]}") from None
    return gptqmodel


def prepare_gptq_base(base: nn.Module) -> None:
    """Keep a gptqmodel CPU kernel in the standard packed layout (called when LoRA wraps it).

    gptqmodel's CPU kernels for aten's int4 matmul (TorchAtenLinear, the default on CPU, TorchFusedLinear
    and their AWQ twins) repack qweight at their first eval-mode forward without grad and remember it in
    `linear_mode` = "inference". That op has no backward and the repacked codes are no longer in GPTQ's
    layout, so training and dequantizing would fail afterwards. Their "train" mode (dequantize and
    matmul, what they use under autograd) gives the same values up to rounding and keeps the layout.
    """
    mode = getattr(base, "linear_mode", None)
    repacked = mode is not None and str(getattr(mode, "value", mode)) == "inference"
    if repacked or getattr(base, "_cpu_transformed", False):
        raise LorakitError(f"{type(base).__name__} was already repacked for aten's int4 inference kernel, which "
                           "cannot train or be dequantized; add the adapter before the model's first forward, or "
                           "load it with quantization_config=GPTQConfig(bits=..., backend='torch') "
                           "(AWQ: AwqConfig(..., backend='torch_awq'))")
    if hasattr(base, "linear_mode") and mode is None:
        base.linear_mode = "train"  # LinearMode is a str enum: "train" == LinearMode.TRAIN


def refuse_inference_only(model: nn.Module) -> None:
    """Before training: a LorakitError naming the way out if a gptqmodel layer of `model` is an
    inference-only kernel (SUPPORTS_TRAINING = False: the AVX-512 CPU kernels that gptqmodel's "auto"
    backend picks on CPUs with AVX512-BF16), instead of gptqmodel's NotImplementedError from train()."""
    for name, module in model.named_modules():
        if is_gptq_layer(module) and getattr(type(module), "SUPPORTS_TRAINING", True) is False:
            raise LorakitError(f"{name} is {type(module).__name__}, an inference-only {quant_method(module).upper()} "
                               "kernel, so the model cannot train; load it with quantization_config="
                               "GPTQConfig(bits=..., backend='auto_trainable') (AWQ: AwqConfig(..., "
                               "backend='auto_trainable')), as lorakit's own loader does for GPTQ and AWQ checkpoints")


def keep_trainable(model: nn.Module) -> None:
    """prepare_gptq_base on every gptqmodel layer of `model`, adapted or not (called by add_adapter).

    A frozen, un-adapted layer repacked for inference would return outputs without a grad_fn in training
    and so cut, silently, the gradient to every adapter before it.
    """
    for module in model.modules():
        if is_gptq_layer(module):
            prepare_gptq_base(module)


def dequantize_weight(base: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The dense weight (out, in) of a gptqmodel GPTQ or AWQ layer, in its scales' dtype (or `dtype`).

    GPTQ: the kernel's own dequantize_weight, called through its class (TorchLinear keeps a
    torch.compile'd copy on the instance; compiling it costs seconds for one read). AWQ: gptqmodel's
    dequantize_gemm of qweight, qzeros, scales. Both return (in, out), transposed here.
    """
    if not is_gptq_layer(base):
        raise LorakitError(f"dequantize_weight takes a gptqmodel quantized linear, got {type(base).__name__}")
    method = quant_method(base)
    _gptqmodel(method)
    prepare_gptq_base(base)
    if method == "awq":
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

        W = dequantize_gemm(base.qweight, base.qzeros, base.scales, base.bits, base.group_size)  # (in, out)
    else:
        W = type(base).dequantize_weight(base)  # (in, out)
    W = W.T
    return W.to(dtype) if dtype is not None else W


class _GptqLinear(BaseKind):
    """A gptqmodel quantized linear: forward through its kernel, dense weight by dequantizing."""

    quantized = True

    def __init__(self, name: str, method: str, cast_delta: bool):
        self.name, self.method, self._cast_delta = name, method, cast_delta

    @property
    def cast_delta(self) -> bool:
        return self._cast_delta

    def matches(self, module: nn.Module) -> bool:
        return is_gptq_layer(module) and quant_method(module) == self.method

    def weight(self, module: nn.Module) -> torch.Tensor:
        return dequantize_weight(module)

    def storage(self, module: nn.Module) -> torch.Tensor:
        return module.scales

    def set_weight(self, module: nn.Module, W: torch.Tensor) -> None:
        raise LorakitError(f"cannot merge into a {self.method.upper()} base layer ({type(module).__name__}): "
                           "re-quantising is not GPTQ/AWQ (PEFT does not merge these either); use "
                           "lorakit.merge_to_full_precision(model) for an exact merge into a dequantized copy, "
                           "or keep the adapter unmerged")

    def prepare(self, module: nn.Module) -> None:
        prepare_gptq_base(module)


# PEFT's GPTQLoraLinear adds the fp32 delta and casts the sum; its AwqLoraLinear casts the delta first
GPTQ_LINEAR = register(_GptqLinear("gptq QuantLinear", "gptq", cast_delta=False))
AWQ_LINEAR = register(_GptqLinear("awq QuantLinear", "awq", cast_delta=True))
