"""The training fast path: a LoRA linear layer as one autograd node with a hand-written backward."""

from __future__ import annotations

import torch

from . import recompute


def lora_linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
                s: float) -> torch.Tensor:
    """x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ for a frozen W, differentiable in x, the bias, A and B (see _LoraLinear)."""
    return _LoraLinear.apply(x, W, bias, A, B, s)


class _LoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ for a frozen W, with a hand-written backward.

    Autograd would build four nodes per layer (base linear, A, B, add) and sum the base's and the
    adapter's input gradients with a separate (N, in) add. Here backward computes
        gB = g·B (N, r);  grad_x = g·W + s·gB·A;  grad_A = s·gBᵀ·x;  grad_B = s·gᵀ·(x·Aᵀ)
    with the adapter's part of grad_x accumulated into the base's by one addmm. Saved: x·Aᵀ (N, r)
    and x, unless A is frozen (LoRA-FA) or x is a product whose factors the base keeps anyway
    (RMSNorm, SwiGLU), which backward multiplies again, once for all the layers that read that x
    (recompute.py); no (N, out) tensor is kept.
    (Folding s·B·A into a temporary weight when tokens outnumber its columns was tried and dropped:
    no gain we could measure over the step, see docs/benchmarks.md.)
    """

    @staticmethod
    def forward(ctx, x, W, bias, A, B, s: float):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xa = x2 @ A.T  # (N, r)
        y = torch.addmm(bias, x2, W.T) if bias is not None else x2 @ W.T  # (N, out)
        y.addmm_(xa, B.T, alpha=s)
        ctx.s = s
        # x is needed for A's gradient only; rebuilt in backward when the base keeps its factors
        ctx.x_rebuild = recompute.shared_plan(x) if ctx.needs_input_grad[3] else None
        keep_x = ctx.needs_input_grad[3] and ctx.x_rebuild is None
        ctx.save_for_backward(x if keep_x else None, xa, W, A, B)
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, xa, W, A, B = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gB = g2 @ B  # (N, r)
        grad_x = (g2 @ W).addmm_(gB, A, alpha=s).view(*g.shape[:-1], W.shape[1]) if need[0] else None
        grad_bias = g2.sum(0) if need[2] else None
        if need[3] and ctx.x_rebuild is not None:
            x = ctx.x_rebuild.take()
        grad_A = (gB.T @ x.reshape(-1, x.shape[-1])).mul_(s) if need[3] else None  # (r, in)
        grad_B = (g2.T @ xa).mul_(s) if need[4] else None  # (out, r)
        return grad_x, None, grad_bias, grad_A, grad_B, None
