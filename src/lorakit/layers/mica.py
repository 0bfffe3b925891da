"""MiCA (Minor Component Adaptation) as a variant object: B from the base weight's minor singular vectors.

init_lora_weights="mica": B (out, r) is the r left singular vectors of W0 (out, in) with the smallest
singular values, A is zero, and B stays frozen: only A trains, so the update s·B·A lives in the
subspace the base weight uses least. For nn.Embedding, as PEFT, the projection is W0ᵀ (dim, num): B
(dim, r) from its minor left singular vectors, A (r, num) zero. Since A = 0 the layer starts exactly at
W0 and the base weight is left as it is (unlike PiSSA).

As PEFT: the plain factors are drawn first (so the RNG moves as for plain LoRA), then overwritten; the
SVD is taken in fp32 and the factors stored in the base dtype; r must be at most min(out, in). Forward
and merge are plain LoRA's, computed op for op as PEFT does; `frozen` tells adapters/manage.py which
of the adapter's tensors never train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorakitError
from .variant import Variant


class MiCA(Variant):
    """The MiCA variant of one adapter in one layer."""

    name = "mica"
    frozen = ("lora_B",)  # the layer's stores whose tensor of this adapter stays requires_grad=False

    def __init__(self, r: int):
        self.r = r

    def check(self, layer: nn.Module) -> None:
        if layer.kind not in ("linear", "conv1d", "embedding") or layer.base_kind.quantized:
            raise LorakitError(f"init_lora_weights='mica' is supported for linear and embedding layers with a "
                               f"float weight (as in PEFT), not {layer._label()}; leave this module out of "
                               "target_modules or use another init")
        limit = min(layer.in_features, layer.out_features)
        if self.r > limit:
            raise LorakitError(f"MiCA requires r <= min(in_features, out_features) = {limit} for {layer._label()}, "
                               f"got r={self.r}; lower r (rank_pattern) or leave this module out")

    @torch.no_grad()
    def added(self, layer: nn.Module, name: str) -> None:
        """B <- the minor left singular vectors of W0 (Wᵀ for an embedding), A <- 0; B frozen."""
        A, B = layer.lora_A[name], layer.lora_B[name]
        B.requires_grad_(False)
        if A.is_meta:  # low_cpu_mem_usage: the values come from a state dict
            return
        W = layer.dense_weight().float()  # (out, in); embedding (num, dim)
        if layer.kind == "embedding":
            W = W.T  # (dim, num): what the adapter's B·A adds to, as PEFT
        U = torch.linalg.svd(W, full_matrices=False)[0]  # (out, k), singular values descending
        B.data = U[:, -self.r:].contiguous().to(B.device, B.dtype)  # (out, r)
        A.data = torch.zeros(self.r, W.shape[1], device=A.device, dtype=A.dtype)  # (r, in)

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, dropout: nn.Module,
              owned: bool = False) -> tuple[torch.Tensor, bool]:
        """Plain LoRA, as PEFT's MiCA forward: result + s·B(A(dropout(x))); embedding: ids looked up in Aᵀ."""
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        if layer.kind == "embedding":
            return result + (layer.embed(x, A.T) @ B.T) * s, True
        return result + F.linear(F.linear(dropout(x), A), B) * s, True

    def merged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, base: torch.Tensor | None = None
                      ) -> torch.Tensor:
        return W + layer.delta_weight(name).to(W.dtype)

    def unmerged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, forget: bool = True) -> torch.Tensor:
        return W - layer.delta_weight(name).to(W.dtype)
