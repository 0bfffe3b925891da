"""The forgetting check: did the adapter damage what the base model knew?

A task adapter should change answers on its task and little else. We measure that on general text
that ships with lorakit (general.txt: 47 short passages on everyday topics, written for lorakit and
under its license), never on the task data: the base model's and the adapter's perplexity on it, and
the mean per-token KL(adapter ‖ base) between their next-token distributions. A perplexity that rose
by more than a few percent, or a KL far above the task-free noise (0 for an untouched adapter), means
the adapter overwrote general behaviour (catastrophic forgetting); lower the learning rate or rank,
train fewer steps, or mix general data into training.

Public: general_text, forgetting.
"""

from __future__ import annotations

import math
from importlib import resources

import torch
from torch import nn

from ..adapters import manage
from ..data import batching, prepare


def general_text() -> list[dict]:
    """The shipped general-text sample as 'text' records, one per passage (blank-line separated)."""
    raw = resources.files("lorakit.eval").joinpath("general.txt").read_text(encoding="utf-8")
    return [{"text": p.strip()} for p in raw.split("\n\n") if p.strip()]


def forgetting(model: nn.Module, tokenizer, records: list[dict] | None = None, max_length: int = 256,
               batch_size: int = 8) -> dict:
    """Base vs adapter on general text: perplexities, their relative change, and KL(adapter ‖ base).

    records: 'text' records to measure on (default: general_text()). The model must carry an active
    adapter; the base is the same model with its adapters disabled, so no second copy is loaded.
    Two forwards per batch (with and without the adapter) give all three numbers.
    Returns {"base_perplexity", "adapter_perplexity", "perplexity_change" (adapter/base - 1, a fraction),
    "kl" (nats per token), "tokens", "passages"}.
    """
    records = general_text() if records is None else records
    data = prepare(records, tokenizer, max_length, train_on_prompt=True)
    sums = _one_pass(model, data, batch_size)
    base_ppl, adapter_ppl = (math.exp(min(sums[k] / max(sums["tokens"], 1), 50)) for k in ("ce_base", "ce_adapter"))
    return {"base_perplexity": base_ppl, "adapter_perplexity": adapter_ppl,
            "perplexity_change": adapter_ppl / base_ppl - 1.0,
            "kl": sums["kl"] / max(sums["positions"], 1), "tokens": sums["tokens"], "passages": len(data)}


@torch.no_grad()
def _one_pass(model: nn.Module, data, batch_size: int) -> dict:
    """One forward with the adapter and one without per batch; from their logits both perplexities
    (cross-entropy over labelled next tokens) and KL(adapter ‖ base) over the real positions."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums = dict(ce_adapter=0.0, ce_base=0.0, kl=0.0, tokens=0, positions=0)
    for batch in batching.batches(data, batch_size, seed=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logp_a = torch.log_softmax(model(**inputs).logits.float(), dim=-1)  # (B, T, V)
        with manage.disable_adapters(model):
            logp_b = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
        mask = inputs["attention_mask"].bool()
        sums["kl"] += float((logp_a.exp() * (logp_a - logp_b)).sum(-1)[mask].sum())
        sums["positions"] += int(mask.sum())
        target = batch["labels"][:, 1:]  # position t predicts token t+1
        keep = target != batching.IGNORE_INDEX
        for key, logp in (("ce_adapter", logp_a), ("ce_base", logp_b)):
            sums[key] -= float(logp[:, :-1][keep].gather(1, target[keep][:, None]).sum())
        sums["tokens"] += int(keep.sum())
    model.train(was_training)
    return sums


def describe(result: dict) -> str:
    """One line for people: 'general text: perplexity 12.31 -> 12.40 (+0.7%), KL 0.0042 nats/token'."""
    return (f"general text ({result['passages']} passages, {result['tokens']} tokens): perplexity "
            f"{result['base_perplexity']:.2f} -> {result['adapter_perplexity']:.2f} "
            f"({100 * result['perplexity_change']:+.1f}%), KL(adapter||base) {result['kl']:.4f} nats/token")
