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

from importlib import resources

from torch import nn

from ..adapters import manage
from ..data import prepare
from .drift import kl_drift
from .perplexity import loss_and_perplexity


def general_text() -> list[dict]:
    """The shipped general-text sample as 'text' records, one per passage (blank-line separated)."""
    raw = resources.files("lorakit.eval").joinpath("general.txt").read_text(encoding="utf-8")
    return [{"text": p.strip()} for p in raw.split("\n\n") if p.strip()]


def forgetting(model: nn.Module, tokenizer, records: list[dict] | None = None, max_length: int = 256,
               batch_size: int = 8) -> dict:
    """Base vs adapter on general text: perplexities, their relative change, and KL(adapter ‖ base).

    records: 'text' records to measure on (default: general_text()). The model must carry an active
    adapter; the base is the same model with its adapters disabled, so no second copy is loaded.
    Returns {"base_perplexity", "adapter_perplexity", "perplexity_change" (adapter/base - 1, a fraction),
    "kl" (nats per token), "tokens", "passages"}.
    """
    records = general_text() if records is None else records
    data = prepare(records, tokenizer, max_length, train_on_prompt=True)
    adapted = loss_and_perplexity(model, data, batch_size)
    with manage.disable_adapters(model):
        base = loss_and_perplexity(model, data, batch_size)
    drift = kl_drift(model, data, batch_size)
    return {"base_perplexity": base["perplexity"], "adapter_perplexity": adapted["perplexity"],
            "perplexity_change": adapted["perplexity"] / base["perplexity"] - 1.0,
            "kl": drift["kl"], "tokens": adapted["tokens"], "passages": len(data)}


def describe(result: dict) -> str:
    """One line for people: 'general text: perplexity 12.31 -> 12.40 (+0.7%), KL 0.0042 nats/token'."""
    return (f"general text ({result['passages']} passages, {result['tokens']} tokens): perplexity "
            f"{result['base_perplexity']:.2f} -> {result['adapter_perplexity']:.2f} "
            f"({100 * result['perplexity_change']:+.1f}%), KL(adapter||base) {result['kl']:.4f} nats/token")
