"""The Fastfood transform: a random (D, d) projection P applied in O(n log n), never stored densely.

    P·x = scale · S_D · H · G · Π · H · B · pad_n(x)        (Le et al. 2013; Li et al. 2018; Aghajanyan
                                                             et al. 2020 use it per parameter tensor)

n = 2^ceil(log2(max(D, d))); pad_n puts x (d,) into n zeros; B is a ±1 diagonal, H the (unnormalised,
Sylvester-ordered) Walsh-Hadamard matrix, Π a permutation ((Π·v)_k = v_{perm[k]}), G a Gaussian
diagonal, S_D keeps the first D rows. scale = 1 / (sqrt(n·||G||²) · sqrt(D/n)) makes every column of
P about unit norm. Everything random comes from one seed, so the same seed gives the same P.

The backward is the adjoint, written out (H is symmetric, Πᵀ is the inverse permutation):
    Pᵀ·g = scale · pad_nᵀ · B · H · Πᵀ · G · H · S_Dᵀ · g
"""

from __future__ import annotations

import math

import torch
from torch import nn


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform over the last dim (a power of two): H·x, H Sylvester-ordered."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)  # pairs (i, i + h) inside blocks of 2h
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


class _Fastfood(torch.autograd.Function):
    """y = P·x over the last dim of x (..., d) -> (..., D); backward is Pᵀ (the adjoint), not autograd's trace."""

    @staticmethod
    def forward(ctx, x, signs, perm, inverse, gauss, size: int, scale: float):
        ctx.save_for_backward(signs, inverse, gauss)
        ctx.d, ctx.size, ctx.scale = x.shape[-1], size, scale
        n = signs.shape[0]
        v = torch.nn.functional.pad(x, (0, n - x.shape[-1])) * signs
        v = fwht(v)[..., perm] * gauss
        return fwht(v)[..., :size] * scale

    @staticmethod
    def backward(ctx, grad):
        signs, inverse, gauss = ctx.saved_tensors
        n = signs.shape[0]
        v = torch.nn.functional.pad(grad, (0, n - ctx.size)) * ctx.scale
        v = fwht(v) * gauss
        v = fwht(v[..., inverse]) * signs
        return v[..., :ctx.d], None, None, None, None, None, None


class Fastfood(nn.Module):
    """One (size, d) Fastfood projection, deterministic from `seed`; call it on θd (d,) to get (size,).

    Its randomness is kept as buffers (not saved in state dicts: the seed rebuilds them)."""

    def __init__(self, size: int, d: int, seed: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        if size < 1 or d < 1:
            raise ValueError(f"Fastfood needs size >= 1 and d >= 1, got size={size}, d={d}")
        n = 1 << max(0, math.ceil(math.log2(max(size, d))))
        g = torch.Generator().manual_seed(int(seed))
        signs = torch.randint(0, 2, (n,), generator=g).to(dtype) * 2 - 1
        perm = torch.randperm(n, generator=g)
        gauss = torch.randn(n, generator=g, dtype=torch.float64)
        self.size, self.d, self.n = size, d, n
        # scale: unit-norm columns in expectation (see the module docstring)
        self.scale = float(1.0 / (math.sqrt(n * float(gauss.pow(2).sum())) * math.sqrt(size / n)))
        self.register_buffer("signs", signs, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inverse", torch.argsort(perm), persistent=False)
        self.register_buffer("gauss", gauss.to(dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d:
            raise ValueError(f"Fastfood built for d={self.d}, got an input of {x.shape[-1]}")
        return _Fastfood.apply(x, self.signs.to(x.dtype), self.perm, self.inverse, self.gauss.to(x.dtype),
                               self.size, self.scale)

    def dense(self) -> torch.Tensor:
        """The (size, d) matrix P, column by column (for tests and small sizes only)."""
        eye = torch.eye(self.d, dtype=self.gauss.dtype)
        return self(eye).T
