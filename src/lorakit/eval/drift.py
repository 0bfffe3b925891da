"""KL drift: how far an adapter moved the model's next-token distributions from its base's."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import manage
from ..data import batching


@torch.no_grad()
def kl_drift(model: nn.Module, dataset, batch_size: int = 8) -> dict:
    """Mean per-token KL(adapter ‖ base) over the non-padding positions: how far the adapter moved the model."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batching.batches(dataset, batch_size, seed=0):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logp_a = torch.log_softmax(model(**inputs).logits.float(), dim=-1)  # (B, T, V)
        with manage.disable_adapters(model):
            logp_b = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
        kl = (logp_a.exp() * (logp_a - logp_b)).sum(-1)  # (B, T)
        mask = inputs["attention_mask"]
        mask = mask.bool() if mask.dim() == 2 else torch.ones_like(kl, dtype=torch.bool)
        total, count = total + float(kl[mask].sum()), count + int(mask.sum())
    model.train(was_training)
    return {"kl": total / max(count, 1), "tokens": count}
