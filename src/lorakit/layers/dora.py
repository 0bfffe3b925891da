"""DoRA (Liu et al. 2024) as a variant object of a LoRA layer: it owns its norm cache and merge factor.

DoRA splits the adapted weight into a magnitude m (out,) and a direction:
    W' = m · (W0 + s·BA) / ||W0 + s·BA||_row,   the norm per output row, detached from the graph.
PEFT adds (m/n - 1)·(W0·x) + (m/n)·s·B·A·x to the base output, n = ||W0 + s·BA||_row; we compute the
same value as (m/n)·(W0·x) + bias + B'·A·x with B' = (m/n)·s·B, i.e. the per-row factor folded into
the small B (see DoRA.apply). m lives in the layer's `lora_magnitude_vector` (PEFT's key).
We never build W0 + s·BA to get n: with the rows' squared norms of W0 known,
    n² = ||W0||² + 2s·rowsum((W0·Aᵀ) ⊙ B) + s²·rowsum((B·A·Aᵀ) ⊙ B),
which costs O(out·in·r) with (out, r) temporaries instead of an (out, in) one.

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

from ..errors import LorakitError
from .layer import Variant


def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                     w_sq: torch.Tensor | None = None) -> torch.Tensor:
    """||W + s·B·A|| per output row, shape (out,), without materialising the (out, in) sum.

    W (out, in), A (r, in), B (out, r). w_sq: ||W||² per row, if known.
    """
    A, B = A.detach().to(W.dtype), B.detach().to(W.dtype)
    if w_sq is None:
        w_sq = W.pow(2).sum(dim=1)  # (out,)
    cross = ((W @ A.T) * B).sum(dim=1)  # (out, r) -> (out,)
    lora_sq = ((B @ (A @ A.T)) * B).sum(dim=1)  # (out,)
    return (w_sq + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()


def _key(*tensors: torch.Tensor) -> tuple | None:
    """What a cached value computed from `tensors` is valid for; None if one of them may be trained."""
    if any(t.requires_grad for t in tensors):
        return None
    return tuple((t.data_ptr(), t._version, t.dtype) for t in tensors)


class DoRA(Variant):
    """The DoRA variant of one adapter in one layer."""

    name = "dora"

    def __init__(self):
        self._norm: tuple | None = None  # (key, norm (out,))
        self._w_sq: tuple | None = None  # (key, ||W0||² per row (out,))
        self._merge_factor: torch.Tensor | None = None  # m/||W+ΔW|| used at merge, for unmerge

    def check(self, layer: nn.Module) -> None:
        if layer.kind == "embedding":
            raise LorakitError("DoRA on nn.Embedding is not supported by lorakit; leave the embedding out of "
                               "target_modules or set use_dora=False")
        if layer.kind == "conv":
            raise LorakitError(f"DoRA on convolutions ({type(layer.base_layer).__name__}) is not supported by "
                               "lorakit yet; leave the conv layers out of target_modules or set use_dora=False")

    @torch.no_grad()
    def added(self, layer: nn.Module, name: str) -> None:
        """m = ||W + s·BA|| per row, computed like PEFT: directly, in the base dtype, before upcasting."""
        A, B = layer.lora_A[name], layer.lora_B[name]
        W = layer.dense_weight().to(A.dtype)  # a quantized base dequantizes to its compute dtype
        m = torch.linalg.norm(W + layer.scaling[name] * (B.to(W.dtype) @ A.to(W.dtype)), dim=1)
        layer.lora_magnitude_vector[name] = nn.Parameter(m.to(A.dtype))

    def reset(self) -> None:
        self._norm = self._w_sq = None

    def norm(self, layer: nn.Module, name: str, W: torch.Tensor) -> torch.Tensor:
        """The detached ||W + s·BA|| per row, from the cache when W, A and B are frozen and unchanged."""
        A, B = layer.lora_A[name], layer.lora_B[name]
        key = _key(W, A, B)
        if key is not None and self._norm is not None and self._norm[0] == key:
            return self._norm[1]
        w_key = _key(W)
        with torch.no_grad():
            hit = self._w_sq is not None and w_key is not None and self._w_sq[0] == w_key
            w_sq = self._w_sq[1] if hit else W.pow(2).sum(dim=1)
            norm = dora_weight_norm(W, A, B, layer.scaling[name], w_sq)
        if not torch.is_inference_mode_enabled():  # inference tensors cannot be reused under autograd
            self._w_sq = (w_key, w_sq) if w_key is not None else None
            self._norm = (key, norm) if key is not None else None
        return norm

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, dropout: nn.Module,
              owned: bool = False) -> tuple[torch.Tensor, bool]:
        """The output with this adapter applied to the output so far, `result`; (new result, owned).

        PEFT adds (k - 1)·base + k·s·B·A·x to `result`, k = m/||W0 + s·BA|| (1, out), base = result without
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
    def merged_weight(self, layer: nn.Module, name: str, W: torch.Tensor) -> torch.Tensor:
        """m/||W+ΔW|| · (W + ΔW); the factor m/||W+ΔW|| is kept for unmerge."""
        combined = W + layer.delta_weight(name).to(W.dtype)
        factor = layer.lora_magnitude_vector[name].to(W.dtype) / torch.linalg.norm(combined, dim=1)  # (out,)
        self._merge_factor = factor
        return factor.view(-1, 1) * combined

    @torch.no_grad()
    def unmerged_weight(self, layer: nn.Module, name: str, W: torch.Tensor) -> torch.Tensor:
        factor, self._merge_factor = self._merge_factor, None
        return W / factor.view(-1, 1) - layer.delta_weight(name).to(W.dtype)


def _dora_delta(base_out: torch.Tensor, lora_out: torch.Tensor, scale: torch.Tensor, s: float) -> torch.Tensor:
    """PEFT's DoRA term, op for op: (k - 1)·base + k·lora·s."""
    scale = scale.view(1, -1)
    return (scale - 1) * base_out + scale * lora_out * s
