"""The causal-LM loss, computed only where it counts.

In chat data most positions are prompt tokens with label -100, and the (tokens × vocabulary) logits
tensor is the largest thing a small model makes (49k vocabulary). So we run the decoder for hidden
states, keep the N positions whose next token carries a label, and apply the output head to those
alone, in chunks, inside one autograd function that computes the gradient of the summed loss with
respect to the kept hidden states during the forward pass (the "fused linear cross-entropy" trick):
no chunk's logits outlive its loop iteration, and backward is one multiply. It returns the SUM of the
token losses and their count, so gradient accumulation can weight every token equally.

Models with logit post-processing (soft-capping, logit scales) or a trainable head fall back to the
plain path: full logits, then the same masked sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import IGNORE_INDEX

CHUNK = 2048  # rows per chunk: (2048, 49152) fp32 = 400 MB on the SmolLM2 vocabulary, two such tensors at most


class _FusedLinearCE(torch.autograd.Function):
    """loss_sum = Σ_i CE(h_i · Wᵀ, y_i); grad wrt h computed in forward, chunk by chunk. W frozen."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, W: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None  # (N, H)
        for i in range(0, h.shape[0], chunk):
            # log-probabilities (n, V) in fp32; the logits die here, so two (n, V) tensors at most
            logp = torch.log_softmax((h[i:i + chunk] @ W.T).float(), dim=-1)
            target = y[i:i + chunk]
            total -= logp.gather(1, target[:, None]).sum()
            if grad_h is not None:
                probs = logp.exp_()  # softmax, in place
                probs[torch.arange(len(target), device=h.device), target] -= 1  # d CE / d logits
                grad_h[i:i + chunk] = (probs.to(W.dtype) @ W).to(h.dtype)  # (n, H)
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None), None, None, None


def _plain_head(model: nn.Module) -> nn.Linear | None:
    """The output head if it is a frozen plain nn.Linear with no bias and no logit post-processing."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    cfg = getattr(model, "config", None)
    post = any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in ("final_logit_softcapping", "logit_scale"))
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad or post:
        return None
    return head


def _decoder(model: nn.Module) -> nn.Module | None:
    prefix = getattr(model, "base_model_prefix", None)
    return getattr(model, prefix, None) if prefix else None


def token_loss_sum(model: nn.Module, batch: dict, fused: bool = True) -> tuple[torch.Tensor, int]:
    """(Σ token cross-entropies, number of tokens) for a causal-LM batch with -100 labels."""
    if hasattr(model, "get_base_model"):  # a PeftModel (ours or PEFT's): its layers live in the inner model
        model = model.get_base_model()
    labels = batch["labels"]
    shift = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    keep = shift != IGNORE_INDEX
    n = int(keep.sum())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    head, decoder = (_plain_head(model), _decoder(model)) if fused else (None, None)
    if head is not None and decoder is not None:
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        h = hidden[:, :-1][keep]  # (N, H): only positions that carry a label
        return _FusedLinearCE.apply(h, head.weight, shift[keep], CHUNK), n
    logits = model(**inputs, use_cache=False).logits[:, :-1]  # (B, T-1, V)
    loss = F.cross_entropy(logits[keep].float(), shift[keep], reduction="sum")
    return loss, n
