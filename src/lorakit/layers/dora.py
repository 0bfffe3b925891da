"""DoRA (Liu et al. 2024) as a variant object of a LoRA layer: it owns its norm cache and merge factor.

DoRA splits the adapted weight into a magnitude m and a direction: W' = m · (W0 + ΔW) / ||W0 + ΔW||, the
norm taken per output channel and detached from the graph. Which axis is "per channel" follows PEFT:
    linear / GPT-2 Conv1D   W (out, in): per output row, m (out,)
    nn.Conv1d/2d/3d         W (out, in/g, *k): per output channel over (in/g, *k), m (1, out, 1, ...)
    nn.Embedding            W (num, dim): per embedding *dimension*, over the vocabulary, m (dim,)
m lives in the layer's `lora_magnitude_vector` (PEFT's key), in PEFT's shape, so files load both ways.
Seen as rows, every case is ||Wr + s·Br·Ar|| per row of Wr (n, c) with Ar (r, c), Br (n, r): linear as
is, conv flattened to (out, in·k...) (B is a 1x1 conv), embedding transposed (Wr = Wᵀ (dim, num)).
PEFT builds a grouped conv's ΔW for the norm as (B.view(-1, r) @ A.view(r, -1)).reshape(W.shape); we
build it the same way (`_dense_lora`), as the norm is part of the adapter's numerics.

Forward, as PEFT: result + (k - 1)·(W0·x) + k·s·B·A·x with k = m/n (n the norm); for linear layers we
compute the same value as k·(W0·x) + bias + B'·A·x with B' = k·s·B (see DoRA.apply); for embeddings
k·result + k·s·(A-lookup)·Bᵀ (PEFT's DoraEmbeddingLayer). We never build W0 + s·BA to get n when the
rows form exists: with the rows' squared norms of W0 known,
    n² = ||W0||² + 2s·rowsum((W0·Aᵀ) ⊙ B) + s²·rowsum((B·A·Aᵀ) ⊙ B),
which costs O(n·c·r) with (n, r) temporaries instead of an (n, c) one.

Merging, as PEFT 0.21: the norm is that of the *unmerged* base weight plus this adapter's ΔW (what the
forward sees), and the factor is applied to the current weight (which may hold earlier merges), so
merging any sequence of plain and DoRA adapters equals the unmerged forward. The factor is kept for unmerge.

The norm is cached only while nothing can change it behind our back: W0, A and B all frozen
(requires_grad False, so no optimizer steps them), keyed on their data pointers and version counters,
and dropped whenever the layer writes its base weight. A trainable adapter's norm is recomputed at
every forward: optimizers may update parameters without bumping version counters (torch's fused
AdamW does not), so a version-keyed cache would keep a stale norm through training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .variant import Variant


def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                     w_sq: torch.Tensor | None = None) -> torch.Tensor:
    """||W + s·B·A|| per row, shape (n,), without materialising the (n, c) sum.

    W (n, c), A (r, c), B (n, r). w_sq: ||W||² per row, if known.
    """
    A, B = A.detach().to(W.dtype), B.detach().to(W.dtype)
    if w_sq is None:
        w_sq = W.pow(2).sum(dim=1)  # (n,)
    cross = ((W @ A.T) * B).sum(dim=1)  # (n, r) -> (n,)
    lora_sq = ((B @ (A @ A.T)) * B).sum(dim=1)  # (n,)
    return (w_sq + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()


def _key(*tensors: torch.Tensor) -> tuple | None:
    """What a cached value computed from `tensors` is valid for; None if one of them may be trained."""
    if any(t.requires_grad for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


def _rows(layer: nn.Module, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    """(Wr (n, c), Ar (r, c), Br (n, r)) with the DoRA norm = ||Wr + s·Br·Ar|| per row; None for a
    grouped conv, whose norm PEFT takes of a ΔW that has no such form (see _dense_lora)."""
    if layer.kind == "embedding":  # W (num, dim), A (r, num), B (dim, r): norm per dim, over the vocabulary
        return W.T, A, B
    if layer.kind == "conv":
        if layer.base_layer.groups > 1:
            return None
        return W.flatten(1), A.flatten(1), B.flatten(1)  # (out, in·k...), (r, in·k...), (out, r)
    return W, A, B


def _dense_lora(layer: nn.Module, W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """B·A in the rows layout of `W`, (n, c), as PEFT builds it for the norm (for a grouped conv too)."""
    if layer.kind == "conv":
        r = A.shape[0]
        return (B.reshape(-1, r) @ A.reshape(r, -1)).reshape(W.shape).flatten(1)
    return B @ A  # linear: (out, in); embedding: (dim, num)


def _channel_norm(layer: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """||W|| per DoRA channel of a weight in dense_weight()'s layout, (n,)."""
    if layer.kind == "embedding":
        return torch.linalg.norm(W, dim=0)
    return torch.linalg.norm(W.flatten(1), dim=1)


class DoRA(Variant):
    """The DoRA variant of one adapter in one layer."""

    name = "dora"

    def __init__(self):
        self._norm: tuple | None = None  # (key, norm (n,))
        self._w_sq: tuple | None = None  # (key, ||W0||² per row (n,))
        self._merge_factor: torch.Tensor | None = None  # m/||W0+ΔW|| (n,) used at merge, for unmerge

    @torch.no_grad()
    def added(self, layer: nn.Module, name: str) -> None:
        """m = ||W + s·BA|| per channel, computed like PEFT: directly, in the base dtype, before upcasting."""
        A, B = layer.lora_A[name], layer.lora_B[name]
        W = layer.dense_weight().to(A.dtype)  # a quantized base dequantizes to its compute dtype
        if A.is_meta:  # low_cpu_mem_usage: an empty magnitude of the right shape, loaded later
            W = W.to("meta")
        Wr = _rows(layer, W, A, B)
        Wr = Wr[0] if Wr is not None else W.flatten(1)
        lora = _dense_lora(layer, W, A.to(W.dtype), B.to(W.dtype))
        m = torch.linalg.norm(Wr + layer.scaling[name] * lora, dim=1)  # (n,)
        if layer.kind == "conv":  # PEFT's shape: (1, out, 1, ...)
            m = m.view(1, -1, *(1,) * (W.dim() - 2))
        layer.lora_magnitude_vector[name] = nn.Parameter(m.to(A.dtype))

    def reset(self) -> None:
        self._norm = self._w_sq = None

    def norm(self, layer: nn.Module, name: str, W: torch.Tensor) -> torch.Tensor:
        """The detached ||W + s·BA|| per channel (n,), from the cache when W, A and B are frozen and unchanged."""
        A, B = layer.lora_A[name], layer.lora_B[name]
        key = _key(W, A, B)
        if key is not None and self._norm is not None and self._norm[0] == key:
            return self._norm[1]
        rows = _rows(layer, W, A, B)
        with torch.no_grad():
            if rows is None:  # grouped conv: PEFT's dense form
                norm = torch.linalg.norm(W.flatten(1) + layer.scaling[name] * _dense_lora(
                    layer, W, A.detach().to(W.dtype), B.detach().to(W.dtype)), dim=1)
                w_key = w_sq = None
            else:
                Wr, Ar, Br = rows
                w_key = _key(W)
                hit = self._w_sq is not None and w_key is not None and self._w_sq[0] == w_key
                w_sq = self._w_sq[1] if hit else Wr.pow(2).sum(dim=1)
                norm = dora_weight_norm(Wr, Ar, Br, layer.scaling[name], w_sq)
        if not torch.is_inference_mode_enabled():  # inference tensors cannot be reused under autograd
            self._w_sq = (w_key, w_sq) if w_key is not None else None
            self._norm = (key, norm) if key is not None else None
        return norm

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, dropout: nn.Module,
              owned: bool = False) -> tuple[torch.Tensor, bool]:
        """The output with this adapter applied to the output so far, `result`; (new result, owned)."""
        if layer.kind == "embedding":
            return self._apply_embedding(layer, name, x, result), True
        if layer.kind == "conv":
            return self._apply_conv(layer, name, x, result, dropout), True
        return self._apply_linear(layer, name, x, result, dropout, owned)

    def _scale(self, layer: nn.Module, name: str, W: torch.Tensor) -> torch.Tensor:
        """k = m / ||W0 + s·BA|| per channel, (n,), with gradient into m only."""
        return layer.lora_magnitude_vector[name].flatten() / self.norm(layer, name, W)

    def _apply_embedding(self, layer, name, ids, result):
        """PEFT's DoraEmbeddingLayer: k·result + k·s·(ids looked up in Aᵀ)·Bᵀ, k per embedding dim (dim,)."""
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        scale = self._scale(layer, name, layer.dense_weight())  # (dim,)
        lora_out = (layer.embed(ids, A.T) @ B.T) * s  # (..., dim)
        return scale * result + scale * lora_out

    def _apply_conv(self, layer, name, x, result, dropout):
        """PEFT's conv DoRA: result + (k - 1)·conv(x, W0) + k·s·B(A(x)), k per output channel (1, out, 1, ...)."""
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        base, conv = layer.base_layer, layer.base_kind.conv_fn
        W = layer.dense_weight()
        ones = (1,) * (result.dim() - 2)
        scale = self._scale(layer, name, W).view(1, -1, *ones)
        if not (isinstance(dropout, nn.Identity) or not layer.training):
            x = dropout(x)  # the base must see the same dropped-out x as the adapter
            base_out = conv(x, W.to(x.dtype), None, base.stride, base.padding, base.dilation, base.groups)
        else:
            bias = getattr(base, "bias", None)
            base_out = result - bias.view(1, -1, *ones) if bias is not None else result
        after_A = conv(x, A, None, base.stride, base.padding)  # (N, r, *spatial)
        lora_out = conv(after_A, B, None, 1, 0, 1, base.groups)  # (N, out, *spatial)
        return result + ((scale - 1) * base_out + scale * lora_out * s)

    def _apply_linear(self, layer, name, x, result, dropout, owned):
        """PEFT adds (k - 1)·base + k·s·B·A·x to `result`, k = m/||W0 + s·BA|| (1, out), base = result without
        the bias. That equals k·base + bias + (k·s)·B·A·x, which we compute with the per-row factor k·s
        folded into B (an (out, r) product instead of (tokens, out) ones): one addcmul, and a single
        (tokens, out) tensor saved for backward (PEFT's form saves two). Same value up to float rounding
        (~1 ulp of the output). Without autograd and with `owned`, in place: result·k, += (x·Aᵀ)·(k·s·B)ᵀ.
        """
        A, B, s, m = layer.lora_A[name], layer.lora_B[name], layer.scaling[name], layer.lora_magnitude_vector[name]
        W = layer.dense_weight().to(x.dtype)  # (out, in)
        scale = m / self.norm(layer, name, W)  # (out,)
        bias = getattr(layer.base_layer, "bias", None)
        if not (isinstance(dropout, nn.Identity) or not layer.training):
            # The base must see the same dropped-out x as the adapter: PEFT's form, nothing to fuse.
            x = dropout(x)
            return result + _dora_delta(F.linear(x, W), F.linear(F.linear(x, A), B), scale, s), True
        if not result.dtype == x.dtype == A.dtype == m.dtype:  # mixed precision (autocast, quantized base)
            base_out = result - bias if bias is not None else result  # W0·x without the bias
            return result + _dora_delta(base_out, F.linear(F.linear(x, A), B), scale, s), True
        B_scaled = B * (scale * s).unsqueeze(1)  # (out, r): k·s·B
        after_A = F.linear(x, A)  # (..., r)
        if owned and bias is None and result.is_contiguous():
            out2d = result.view(-1, result.shape[-1])  # (N, out)
            out2d.mul_(scale).addmm_(after_A.reshape(-1, after_A.shape[-1]), B_scaled.T)
            return result, True
        lora_out = F.linear(after_A, B_scaled)  # (..., out)
        if bias is not None:
            return torch.addcmul(lora_out + bias, result - bias, scale), True
        return torch.addcmul(lora_out, result, scale), True

    @torch.no_grad()
    def merged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, base: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """factor · (W + ΔW), factor = m/||W0 + ΔW|| per channel with W0 = `base`, the weight without the
        adapters merged before (default: W). The factor is kept for unmerge."""
        delta = layer.delta_weight(name).to(W.dtype)
        W0 = W if base is None else base
        factor = layer.lora_magnitude_vector[name].flatten().to(W.dtype) / _channel_norm(layer, W0 + delta)  # (n,)
        self._merge_factor = factor
        return _weight_shaped(layer, factor, W) * (W + delta)

    @torch.no_grad()
    def unmerged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, forget: bool = True) -> torch.Tensor:
        """W / factor - ΔW with the factor of the merge; forget=False keeps it (the adapter stays merged)."""
        factor = self._merge_factor
        if forget:
            self._merge_factor = None
        return W / _weight_shaped(layer, factor, W) - layer.delta_weight(name).to(W.dtype)


def _weight_shaped(layer: nn.Module, v: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """A per-channel (n,) vector shaped to broadcast against a weight in dense_weight()'s layout."""
    if layer.kind == "embedding":  # W (num, dim): channels are columns
        return v.view(1, -1)
    return v.view(-1, *(1,) * (W.dim() - 1))  # linear (out, in), conv (out, in/g, *k): channels are rows


def _dora_delta(base_out: torch.Tensor, lora_out: torch.Tensor, scale: torch.Tensor, s: float) -> torch.Tensor:
    """PEFT's DoRA term, op for op: (k - 1)·base + k·lora·s."""
    scale = scale.view(1, -1)
    return (scale - 1) * base_out + scale * lora_out * s
