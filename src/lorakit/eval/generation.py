"""Generation-based evaluation: greedy completions of chat prompts, and exact match against answers."""

from __future__ import annotations

import torch
from torch import nn

from ..data.records import as_messages
from ..errors import LorakitError


def prompt_and_answer(record: dict) -> tuple[list[dict], str]:
    """(prompt messages, expected answer) for a record: everything before its last assistant turn, and that turn."""
    try:
        msgs = as_messages(record)
    except LorakitError:
        raise LorakitError("exact_match needs records with messages, prompt/completion or instruction/output "
                           f"(got fields {sorted(record)})") from None
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return msgs[:last], msgs[last]["content"]


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
            texts = [render(tokenizer, p) for p in prompts[i:i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            outputs += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def render(tokenizer, prompt) -> str:
    """The text `generate` feeds for a prompt: a string as is, messages through the chat template."""
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

