"""VeLoRA (Miles et al. 2024, arXiv 2405.17991) as a variant object: A's backward from compressed inputs.

The forward is plain LoRA's, result + s·B(A(dropout(x))), and so are merge and unmerge (W ± s·BA). What
changes is what A keeps for its backward in training mode: instead of the input x (..., in), each token
is cut into `num_groups` sub-tokens of g = ceil(in / num_groups) features (zero-padded at the end) and
each sub-token is kept as one number, its dot product with a unit vector v (g,):
    c[t, k] = <x[t, k·g:(k+1)·g], v>                       (tokens, num_groups)
and backward rebuilds x ≈ scale · c[t, k] · v (cut back to `in` features) for A's gradient:
    dA = dYᵀ · x̂        (r, in), dY = the gradient at A's output (tokens, r)
The gradient to x itself is exact (dY · A). v lives in the layer's `lora_velora_embed` (PEFT's key, a
buffer: saved in adapter files, never trained) and is set as PEFT's VeloraLinearVariant sets it:
    "random"              v = normalised randn(g) at creation (one draw, in the base dtype, after A/B)
    "batch_average"       v = normalised mean of the batch's sub-tokens, at every training forward
    "batch_average_once"  the same, at the first training forward only (zeros until then)
In eval mode or without grad, A runs as plain F.linear. Linear and GPT-2 Conv1D layers only, as PEFT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorakitError
from .variant import Variant

INIT_TYPES = ("batch_average", "batch_average_once", "random")
STORE = "lora_velora_embed"  # the layer attribute holding v per adapter (PEFT's name)


class BufferStore(nn.Module):
    """name -> tensor, each a persistent buffer (state dict key `<layer>.lora_velora_embed.<name>`)."""

    def __setitem__(self, name: str, value: torch.Tensor) -> None:
        self.register_buffer(name, value, persistent=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def __delitem__(self, name: str) -> None:
        del self._buffers[name]

    def keys(self):
        return self._buffers.keys()

    def values(self):
        return self._buffers.values()


def group_dim(in_features: int, num_groups: int) -> int:
    """g: the sub-token length, ceil(in / num_groups)."""
    return (in_features + num_groups - 1) // num_groups


def sub_tokens(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """x (..., in) as (tokens, num_groups, g), zero-padded to num_groups·g features."""
    g = group_dim(x.shape[-1], num_groups)
    pad = num_groups * g - x.shape[-1]
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(-1, num_groups, g)


def unit(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| in fp32; an all-zero v becomes the normalised ones vector (PEFT's rule)."""
    v = v.float()
    norm = torch.linalg.vector_norm(v)
    if norm == 0:
        v = torch.ones_like(v)
        norm = torch.linalg.vector_norm(v)
    return v / norm


class _CompressedA(torch.autograd.Function):
    """x·Aᵀ whose backward rebuilds x from its (tokens, num_groups) projections onto v for A's gradient."""

    @staticmethod
    def forward(ctx, x, weight, embed, num_groups, scale):
        out = F.linear(x, weight)
        ctx.x_shape, ctx.x_dtype, ctx.num_groups, ctx.scale = tuple(x.shape), x.dtype, num_groups, scale
        compressed = torch.einsum("tgd,d->tg", sub_tokens(x, num_groups), embed.to(x.dtype))  # (tokens, groups)
        ctx.save_for_backward(compressed, weight, embed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        compressed, weight, embed = ctx.saved_tensors
        dtype = grad_out.dtype
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # (tokens, r)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (dy @ weight.to(dtype)).reshape(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            in_features = ctx.x_shape[-1]
            rebuilt = compressed.to(dtype).unsqueeze(-1) * embed.to(dtype).view(1, 1, -1)  # (tokens, groups, g)
            rebuilt = rebuilt.reshape(rebuilt.shape[0], -1)[:, :in_features] * ctx.scale  # (tokens, in)
            grad_w = (dy.T @ rebuilt).to(weight.dtype)  # (r, in)
        return grad_x, grad_w, None, None, None


class VeLoRA(Variant):
    """The VeLoRA variant of one adapter in one layer: its settings and whether v has been set."""

    name = "velora"
    lora_bias = True  # B's bias works as in plain LoRA (PEFT's lora_B is an nn.Linear)

    def __init__(self, num_groups: int = 64, scale: float = 1.0, init_type: str = "batch_average"):
        if init_type not in INIT_TYPES:
            raise LorakitError(f"velora init_type must be one of {list(INIT_TYPES)} (got {init_type!r})")
        self.num_groups, self.scale, self.init_type = num_groups, scale, init_type
        self.initialized = False

    def check(self, layer: nn.Module) -> None:
        if layer.kind not in ("linear", "conv1d") or layer.base_kind.quantized:
            raise LorakitError(f"VeLoRA (velora_config) works on linear layers only, as in PEFT; "
                               f"{layer._label()} ({layer.kind}{', quantized' if layer.base_kind.quantized else ''}) "
                               "cannot take it: leave it out of target_modules or set velora_config=None")

    def added(self, layer: nn.Module, name: str) -> None:
        """v in the base dtype and on its device: one randn draw for "random" (as PEFT, even when the adapter
        is created empty for low_cpu_mem_usage), zeros otherwise."""
        A = layer.lora_A[name]  # in the base dtype here; on meta when created empty: then the base's device
        device, dtype = layer._param_device_dtype() if A.is_meta else (A.device, A.dtype)
        g = group_dim(layer.in_features, self.num_groups)
        if self.init_type == "random":
            v, self.initialized = unit(torch.randn(g, device=device, dtype=dtype)).to(dtype), True
        else:
            v = torch.zeros(g, device=device, dtype=dtype)
        if not isinstance(getattr(layer, STORE, None), BufferStore):
            setattr(layer, STORE, BufferStore())
        getattr(layer, STORE)[name] = v

    def upcast(self, layer: nn.Module, name: str) -> None:
        store = getattr(layer, STORE)
        store[name] = store[name].float()

    def deleted(self, layer: nn.Module, name: str) -> None:
        del getattr(layer, STORE)[name]

    @torch.no_grad()
    def _update(self, layer: nn.Module, name: str, x: torch.Tensor) -> None:
        """batch_average(_once): v = the normalised mean sub-token of this batch, in v's dtype and device."""
        if self.init_type == "random" or (self.init_type == "batch_average_once" and self.initialized):
            return
        store = getattr(layer, STORE)
        old = store[name]
        mean = sub_tokens(x.detach(), self.num_groups).reshape(-1, old.shape[0]).mean(dim=0)  # (g,)
        store[name] = unit(mean).to(old.device, old.dtype)
        self.initialized = True

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, dropout: nn.Module,
              owned: bool) -> tuple[torch.Tensor, bool]:
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        x = dropout(x)
        if layer.training and torch.is_grad_enabled():
            self._update(layer, name, x)
            after_A = _CompressedA.apply(x, A, getattr(layer, STORE)[name], self.num_groups, self.scale)
        else:
            after_A = F.linear(x, A)  # (..., r)
        return result + F.linear(after_A, B, layer.lora_bias.get(name)) * s, True

    def merged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, base: torch.Tensor | None = None
                      ) -> torch.Tensor:
        return W + layer.delta_weight(name).to(W.dtype)

    def unmerged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, forget: bool = True) -> torch.Tensor:
        return W - layer.delta_weight(name).to(W.dtype)
