"""KaSA (Jiang et al. 2024, arXiv:2412.06071) as a variant object of a LoRA layer, with PEFT 0.21's numerics.

Two changes to plain LoRA on an nn.Linear with weight W (out, in), k = min(out, in):
1. At init the base weight is replaced, once and destructively, by its rank-(k - r) SVD truncation
   W = U·S·Vh -> U[:, :k-r]·S[:k-r]·Vh[:k-r] (computed in fp32, stored back in W's dtype): the r smallest
   singular components are dropped. Disabling, unmerging or unloading the adapter keeps the truncated W.
2. The update carries a learnable diagonal d (r,) between A and B (the layer's `lora_diag`, PEFT's key):
   ΔW = s·(B·diag(d))·A, forward result + B((A·dropout(x)) ⊙ d)·s. d is drawn randn(r) in the adapter's
   dtype after A and B are initialised (B is zero, so the update starts at zero), as PEFT draws it.

The layer's delta_weight folds d into B, so merging, combining and exporting see the KaSA delta.
With low_cpu_mem_usage (a meta adapter) the SVD cannot run at init; as in PEFT it runs at the first
forward or merge, and that first forward subtracts the dropped part (U_d·S_d)·(Vh_d·x) from the base
output it was handed. `kasa_loss` is the paper's regulariser (PEFT's _get_kasa_loss, per layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorakitError
from .variant import Variant


def truncate_base(layer: nn.Module, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the r smallest singular components of the layer's base weight, in place. Returns the dropped
    part as fp32 factors (U_d·S_d (out, r), Vh_d (r, in))."""
    weight = layer.base_layer.weight
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)  # (out, k), (k,), (k, in)
    keep = min(weight.shape) - r
    weight.data = ((U[:, :keep] * S[:keep]) @ Vh[:keep]).to(weight.dtype)
    return U[:, keep:] * S[keep:], Vh[keep:]


def kasa_loss(layer: nn.Module, name: str, beta: float, gamma: float) -> torch.Tensor:
    """beta·||d||² + gamma·(||BᵀB - I||_F + ||A·Aᵀ - I||_F), in fp32 (the paper's Eq. 9-11)."""
    d, A, B = layer.lora_diag[name].float(), layer.lora_A[name].float(), layer.lora_B[name].float()
    eye = torch.eye(d.shape[0], device=d.device)
    ortho = torch.linalg.norm(B.T @ B - eye) + torch.linalg.norm(A @ A.T - eye)
    return beta * (d ** 2).sum() + gamma * ortho


class KaSA(Variant):
    """The KaSA variant of one adapter in one nn.Linear layer."""

    name = "kasa"

    def __init__(self):
        self.deferred = False  # the SVD truncation waits for a real base weight (meta adapter)

    def check(self, layer: nn.Module) -> None:
        if layer.kind == "conv1d":
            raise LorakitError("KaSA does not support fan_in_fan_out=True layers (e.g. GPT-2's Conv1D) "
                               f"({layer._label()}); target nn.Linear layers only, or drop kasa_config")
        if layer.kind != "linear" or layer.base_kind.quantized or not isinstance(layer.base_layer, nn.Linear):
            raise LorakitError(f"{layer._label()} does not support KaSA (as in PEFT, only nn.Linear layers do); "
                               "leave it out of target_modules or set kasa_config=None")

    @torch.no_grad()
    def added(self, layer: nn.Module, name: str) -> None:
        r, A = layer.r[name], layer.lora_A[name]
        k = min(layer.in_features, layer.out_features)
        if r >= k:
            layer.delete(name)
            raise LorakitError(f"KaSA requires r ({r}) < min(in_features, out_features) ({k}) of {layer._label()}, so "
                               "that one singular component of the base weight survives the truncation; lower r "
                               "(rank_pattern) or leave this layer out of target_modules")
        if A.is_meta:  # low_cpu_mem_usage: empty, filled by a state dict; truncate when the weight is real
            layer.lora_diag[name] = nn.Parameter(torch.empty(r, device="meta", dtype=A.dtype))
            self.deferred = True
            return
        layer.lora_diag[name] = nn.Parameter(torch.randn(r, device=A.device, dtype=A.dtype))
        truncate_base(layer, r)

    @torch.no_grad()
    def _catch_up(self, layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Run the truncation deferred at init, if pending; the dropped factors, or None."""
        if not self.deferred:
            return None
        W = layer.base_layer.weight
        if W.is_meta:
            raise LorakitError(f"KaSA on {layer._label()}: its base weight is still on the meta device, so the SVD "
                               "truncation cannot run; load the base weights before a forward or a merge")
        if layer.lora_diag[name].is_meta:  # no state dict filled it: PEFT draws it now
            layer.lora_diag[name] = nn.Parameter(torch.randn(layer.r[name], device=W.device, dtype=W.dtype))
        self.deferred = False
        return truncate_base(layer, layer.r[name])

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, dropout: nn.Module,
              owned: bool = False) -> tuple[torch.Tensor, bool]:
        """result + B((A·dropout(x)) ⊙ d)·s, PEFT's ops; x is already in the adapter's dtype."""
        dropped = self._catch_up(layer, name)
        if dropped is not None:  # `result` used the untruncated weight: take the dropped part out
            us, vh = dropped
            result = result - F.linear(F.linear(x.to(vh.dtype), vh), us).to(result.dtype)
        A, B, d, s = layer.lora_A[name], layer.lora_B[name], layer.lora_diag[name], layer.scaling[name]
        after_A = F.linear(dropout(x), A)  # (..., r)
        return result + F.linear(after_A * d, B) * s, True

    @torch.no_grad()
    def merged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, base: torch.Tensor | None = None
                      ) -> torch.Tensor:
        if self._catch_up(layer, name) is not None:
            W = layer.dense_weight()
        return W + layer.delta_weight(name).to(W.dtype)

    @torch.no_grad()
    def unmerged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, forget: bool = True) -> torch.Tensor:
        return W - layer.delta_weight(name).to(W.dtype)
