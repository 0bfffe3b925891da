"""BD-LoRA (block-diagonal LoRA) as a variant object: one of the two factors is block-diagonal.

With nblocks = k, a block-diagonal A is k blocks of (r/k, in/k) on the diagonal of (r, in), and a
block-diagonal B is k blocks of (out/k, r/k) on the diagonal of (out, r). Serving engines that shard a
layer k ways then need no all-gather for the adapter: a row-sharded layer gets a block-diagonal A, a
column-sharded one a block-diagonal B.

Storage follows PEFT's BlockDiagonalLinear, so files load both ways: the factor keeps only its blocks,
stacked on the row axis, as lora_A (r, in/k) or lora_B (out, r/k) (PEFT's key `...lora_A.weight` holds
that shape); the other factor is a plain (r, in) A or (out, r) B. `factors` gives both as dense matrices
(zeros off the diagonal) for merging and for anything that reads ΔW = s·B·A.

Init, as PEFT (after the plain A and B have been drawn and initialised): a block-diagonal A is drawn
again with torch's default kaiming_uniform_ (a=0, fan_in = in/k), a block-diagonal B is zero, whatever
init_lora_weights says. Forward, as PEFT: result + s·B(A(dropout(x))), each block-diagonal factor applied
block by block (one einsum), never as a dense matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorakitError
from .variant import Variant


def block_linear(x: torch.Tensor, weight: torch.Tensor, nblocks: int) -> torch.Tensor:
    """x (..., in) through the block-diagonal matrix whose k blocks are stacked in weight (out, in/k): (..., out).

    Block i maps x's i-th slice of in/k features to the i-th slice of out/k outputs (PEFT's einsum)."""
    lead = x.shape[:-1]
    x = x.reshape(-1, nblocks, x.shape[-1] // nblocks)  # (N, k, in/k)
    w = weight.view(nblocks, weight.shape[0] // nblocks, weight.shape[1])  # (k, out/k, in/k)
    return torch.einsum("bim,inm->bin", x, w).reshape(*lead, -1)  # (N, k, out/k) -> (..., out)


def block_dense(weight: torch.Tensor, nblocks: int) -> torch.Tensor:
    """The dense block-diagonal matrix (out, in) of the k stacked blocks in weight (out, in/k)."""
    return torch.block_diag(*torch.chunk(weight, nblocks, dim=0))


class BdLora(Variant):
    """The BD-LoRA variant of one adapter in one layer: `side` ("A" or "B") is block-diagonal."""

    name = "bdlora"

    def __init__(self, side: str, nblocks: int, r: int):
        if side not in ("A", "B"):
            raise LorakitError(f"BD-LoRA: side must be 'A' or 'B' (got {side!r})")
        self.side, self.nblocks, self.r = side, nblocks, r

    def check(self, layer: nn.Module) -> None:
        if layer.kind != "linear" or layer.base_kind.quantized:  # PEFT's BD-LoRA fails on GPT-2's Conv1D too
            raise LorakitError(f"BD-LoRA (use_bdlora) is supported for nn.Linear layers only (as in PEFT), not "
                               f"{layer._label()}; leave this module out of target_modules or of use_bdlora")
        k = self.nblocks
        sides = {"A": (("in_features", layer.in_features), ("r", self.r)),
                 "B": (("r", self.r), ("out_features", layer.out_features))}[self.side]
        bad = [f"{what}={n}" for what, n in sides if n % k]
        if bad:
            raise LorakitError(f"BD-LoRA: {layer._label()} has a block-diagonal {self.side} with nblocks={k}, which "
                               f"must divide {' and '.join(bad)}; choose nblocks (or r) so that it does")

    @torch.no_grad()
    def added(self, layer: nn.Module, name: str) -> None:
        """Replace the plain factor on `side` by its block-diagonal form, drawn (A) or zeroed (B) as PEFT."""
        plain = layer.lora_A[name] if self.side == "A" else layer.lora_B[name]
        if self.side == "A":
            shape = (self.r, layer.in_features // self.nblocks)  # (r, in/k)
        else:
            shape = (layer.out_features, self.r // self.nblocks)  # (out, r/k)
        W = torch.empty(shape, device=plain.device, dtype=plain.dtype)
        if not W.is_meta:  # low_cpu_mem_usage: empty, filled from a state dict
            nn.init.kaiming_uniform_(W) if self.side == "A" else nn.init.zeros_(W)
        store = layer.lora_A if self.side == "A" else layer.lora_B
        store[name] = nn.Parameter(W, requires_grad=plain.requires_grad)

    def factors(self, layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, in) and B (out, r) as dense matrices."""
        A, B = layer.lora_A[name], layer.lora_B[name]
        if self.side == "A":
            return block_dense(A, self.nblocks), B
        return A, block_dense(B, self.nblocks)

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, dropout: nn.Module,
              owned: bool = False) -> tuple[torch.Tensor, bool]:
        """result + s·B(A(dropout(x))), the block-diagonal factor applied per block."""
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        x = dropout(x)
        after_A = block_linear(x, A, self.nblocks) if self.side == "A" else F.linear(x, A)  # (..., r)
        lora_out = block_linear(after_A, B, self.nblocks) if self.side == "B" else F.linear(after_A, B)  # (..., out)
        return result + lora_out * s, True

    def merged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, base: torch.Tensor | None = None
                      ) -> torch.Tensor:
        return W + layer.delta_weight(name).to(W.dtype)

    def unmerged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, forget: bool = True) -> torch.Tensor:
        return W - layer.delta_weight(name).to(W.dtype)
