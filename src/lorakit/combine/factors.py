"""One LoRA adapter on one module as plain tensors: Factors(A, B, scaling), its dense ΔW and its negation.

A (r, in), B (out, r), ΔW = scaling · B @ A of shape (out, in). The scaling is the caller's (alpha/r, or
alpha/sqrt(r) with rsLoRA). Nothing here knows about models or nn.Module.
"""

from typing import NamedTuple

import torch


class Factors(NamedTuple):
    """One LoRA adapter on one module: ΔW = scaling · B @ A."""

    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float


def delta(f: Factors) -> torch.Tensor:
    """The dense update scaling · B @ A, shape (out, in), in the factors' dtype."""
    return f.scaling * (f.B @ f.A)


def negate(f: Factors) -> Factors:
    """The exact negation: ΔW becomes -ΔW (B flipped, A and scaling kept)."""
    return Factors(f.A, -f.B, f.scaling)
