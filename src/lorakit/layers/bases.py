"""Base kinds: how a LoRA layer reads and writes the weight of each kind of layer it can wrap.

A base kind is a small object with one job per method, registered here so that a new base layer
type (a quantized linear, a convolution) plugs in without touching the LoRA math:

    family      the adapter's shape convention: "linear" (A (r, in), B (out, r)), "conv1d" (the same,
                for GPT-2's Conv1D whose weight is stored (in, out)), "embedding" (PEFT's convention:
                A (r, num_embeddings), B (dim, r)), "conv" (nn.Conv1d/2d/3d, PEFT's convention: A is a
                conv with the base's kernel, stride and padding, (r, in, *k); B a 1x1 conv with the base's
                groups, (out, r/groups, 1, ...)), "mha" (nn.MultiheadAttention: linear shapes on
                in_proj_weight, in = E, out = 3·E)
    quantized   whether the stored weight is not the dense one (adapters then stay fp32)
    cast_delta  whether the adapters' (fp32) output is cast to the base output's dtype before it is added
                (PEFT's bitsandbytes layers) rather than added in fp32 and the sum cast (its GPTQ/AWQ
                layers); defaults to `quantized`
    matches(m)  whether module m is of this kind
    features(m) (in, out) as the adapter sees them
    weight(m)   the dense weight: (out, in) for linear families, (num_embeddings, dim) for embeddings
    set_weight(m, W)   write a dense weight back (merge, unmerge, PiSSA's residual)
    storage(m)  a tensor the weight is kept in (its device and dtype place the adapters; no dequantizing)
    prepare(m)  called once when LoRA wraps m

`kind_of(module)` asks the registered kinds, most recently registered first (so a subclass kind such
as bitsandbytes' Linear4bit, itself an nn.Linear, is found before plain Linear).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LorakitError


class BaseKind:
    """The plain nn.Linear kind; other kinds override what differs."""

    name = "linear"
    family = "linear"
    quantized = False

    @property
    def cast_delta(self) -> bool:
        return self.quantized

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight

    def set_weight(self, module: nn.Module, W: torch.Tensor) -> None:
        module.weight.data.copy_(W)

    def storage(self, module: nn.Module) -> torch.Tensor:
        return module.weight

    def prepare(self, module: nn.Module) -> None:
        pass

    def repr_name(self, module: nn.Module) -> str:
        """The wrapped layer's class name as PEFT prints it (`lora.Linear`, `lora.Conv2d`, ...)."""
        names = {"linear": "Linear", "conv1d": "Linear", "embedding": "Embedding", "mha": "MultiheadAttention",
                 "param": "ParamWrapper"}
        return names.get(self.family, type(module).__name__)

    def repr_extra(self) -> str:
        """What the wrapped layer's repr adds for this kind (after its adapters)."""
        return ""

    def __repr__(self) -> str:
        return f"<base kind {self.name}>"


class Conv1DKind(BaseKind):
    """transformers' Conv1D (GPT-2): a linear layer whose weight is stored (in, out), "fan_in_fan_out"."""

    name = family = "conv1d"

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ == "Conv1D" and hasattr(module, "nf")

    def features(self, module: nn.Module) -> tuple[int, int]:
        n_in, n_out = module.weight.shape
        return n_in, n_out

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.T

    def set_weight(self, module: nn.Module, W: torch.Tensor) -> None:
        module.weight.data.copy_(W.T)


class EmbeddingKind(BaseKind):
    name = family = "embedding"

    def repr_extra(self) -> str:
        return ", lora_A/lora_B are PEFT's lora_embedding_A (r, num_embeddings) / lora_embedding_B (dim, r)"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.num_embeddings, module.embedding_dim


class ConvKind(BaseKind):
    """nn.Conv1d / nn.Conv2d / nn.Conv3d (grouped too); the dense weight is the conv's (out, in/groups, *k)."""

    family = "conv"

    def __init__(self, cls: type, conv_fn):
        self.cls, self.name, self.conv_fn = cls, cls.__name__.lower(), conv_fn

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, self.cls)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_channels, module.out_channels

    def lora_delta(self, module: nn.Module, A: torch.Tensor, B: torch.Tensor, label: str) -> torch.Tensor:
        """B∘A as one conv weight (out, in, *k): B's 1x1 mixing applied to A's kernels (PEFT's formula)."""
        if module.groups > 1:
            raise LorakitError(f"{label} has groups={module.groups}: merging LoRA into a grouped convolution "
                               "is not supported (as in PEFT); keep the adapter unmerged")
        if all(k == 1 for k in module.kernel_size):  # (out, r) @ (r, in), then the 1x1 kernel dims back
            ones = (1,) * len(module.kernel_size)
            return (B.flatten(1) @ A.flatten(1)).reshape(B.shape[0], A.shape[1], *ones)
        # conv of A's kernels, seen as a batch of `in` images with r channels, by B: (in, out, *k) -> (out, in, *k)
        return self.conv_fn(A.transpose(0, 1), B).transpose(0, 1)


class MultiheadAttentionKind(BaseKind):
    """nn.MultiheadAttention with packed q/k/v: the adapter's weight is in_proj_weight (3·E, E), as PEFT's.

    Its out_proj (an nn.Linear whose forward MultiheadAttention never calls) gets a LoraLayer of its own,
    and the attention runs with both weights adapted (layer.py: LoraLayer._mha_forward)."""

    name = "multiheadattention"
    family = "mha"

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.embed_dim, 3 * module.embed_dim

    def weight(self, module: nn.Module) -> torch.Tensor:
        return module.in_proj_weight

    def set_weight(self, module: nn.Module, W: torch.Tensor) -> None:
        module.in_proj_weight.data.copy_(W)

    def prepare(self, module: nn.Module) -> None:
        if not module._qkv_same_embed_dim:
            raise LorakitError("LoRA on nn.MultiheadAttention needs query, key and value of the same size "
                               "(kdim = vdim = embed_dim, one packed in_proj_weight), as in PEFT; leave this "
                               "module out of target_modules")


_KINDS: list[BaseKind] = [BaseKind(), Conv1DKind(), EmbeddingKind(), ConvKind(nn.Conv1d, torch.conv1d),
                          ConvKind(nn.Conv2d, torch.conv2d), ConvKind(nn.Conv3d, torch.conv3d),
                          MultiheadAttentionKind()]


def register(kind: BaseKind) -> BaseKind:
    """Add a base kind; it is asked before the ones registered earlier. Returns it."""
    _KINDS.insert(0, kind)
    return kind


def kind_of(module: nn.Module) -> BaseKind | None:
    """The base kind of `module`, or None when LoRA cannot wrap it."""
    return next((k for k in _KINDS if k.matches(module)), None)


def supported() -> str:
    """The wrappable layer types, for error messages."""
    return ", ".join(k.name for k in reversed(_KINDS))


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight of a wrappable base module, in its kind's layout (dequantized if quantized)."""
    kind = kind_of(module)
    if kind is None:
        raise LorakitError(f"{type(module).__name__} is not a layer LoRA can wrap; supported: {supported()}")
    return kind.weight(module)
