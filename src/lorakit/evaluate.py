"""Evaluation: mean loss and perplexity on a dataset (more metrics build on these)."""

from __future__ import annotations

import math

import torch
from torch import nn

from . import batching
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


# -- generation-based metrics ---------------------------------------------------------------------------

def prompt_and_answer(record: dict) -> tuple[list[dict] | str, str]:
    """(prompt messages, expected answer) for a record: the completion / output / last assistant turn."""
    if "messages" in record:
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs[last]["content"]
    if "prompt" in record:
        return [{"role": "user", "content": record["prompt"]}], record["completion"]
    if "instruction" in record:
        user = record["instruction"] + ("\n\n" + record["input"] if record.get("input") else "")
        return [{"role": "user", "content": user}], record["output"]
    raise ValueError("exact_match needs records with messages, prompt/completion or instruction/output")


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list, max_new_tokens: int = 64, batch_size: int = 16,
             progress: bool = False) -> list[str]:
    """Greedy completions for chat prompts (lists of messages) or plain strings, batched with left padding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    outputs = []
    chunks = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="generate", unit="batch")
    try:
        for i in chunks:
            texts = [_render(tokenizer, p) for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def _render(tokenizer, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in prompt) + "\n"


def exact_match(model: nn.Module, tokenizer, rows: list[dict], max_new_tokens: int | None = None,
                batch_size: int = 16, progress: bool = False) -> dict:
    """Share of rows whose greedy completion equals the expected answer after stripping whitespace."""
    pairs = [prompt_and_answer(r) for r in rows]
    if max_new_tokens is None:  # just above the longest answer
        max_new_tokens = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in pairs) + 8
    got = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens, batch_size, progress)
    hits = [g.strip() == a.strip() for g, (_, a) in zip(got, pairs)]
    return {"exact_match": sum(hits) / max(len(hits), 1), "n": len(hits),
            "samples": [{"expected": a, "got": g, "ok": h} for (_, a), g, h in zip(pairs, got, hits)]}


@torch.no_grad()
def kl_drift(model: nn.Module, dataset, batch_size: int = 8) -> dict:
    """Mean per-token KL(adapter ‖ base) over the non-padding positions: how far the adapter moved the model."""
    from . import adapters
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in batching.batches(dataset, batch_size, seed=0):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logp_a = torch.log_softmax(model(**inputs).logits.float(), dim=-1)  # (B, T, V)
        with adapters.disable_adapters(model):
            logp_b = torch.log_softmax(model(**inputs).logits.float(), dim=-1)
        kl = (logp_a.exp() * (logp_a - logp_b)).sum(-1)  # (B, T)
        mask = inputs["attention_mask"]
        mask = mask.bool() if mask.dim() == 2 else torch.ones_like(kl, dtype=torch.bool)
        total, count = total + float(kl[mask].sum()), count + int(mask.sum())
    model.train(was_training)
    return {"kl": total / max(count, 1), "tokens": count}
