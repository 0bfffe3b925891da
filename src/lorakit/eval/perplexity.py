"""Loss and perplexity of a model on a dataset, over the tokens that carry a label."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data import batching
from .losses import token_loss_sum


@torch.no_grad()
def loss_and_perplexity(model: nn.Module, dataset, batch_size: int = 8, device=None) -> dict:
    """Token-weighted mean cross-entropy over the loss-carrying tokens, and exp of it."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batching.batches(dataset, batch_size, seed=0, group_by_length=True):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss_sum, n = token_loss_sum(model, batch)
        total, count = total + float(loss_sum), count + n
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50)), "tokens": count}
