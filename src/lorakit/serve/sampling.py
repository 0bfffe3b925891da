"""Per-request sampling and text: SamplingParams, choosing the next token, incremental text with stops.

Sampling is per request and never depends on the batch: greedy is argmax of that row's fp32 logits;
otherwise temperature and top-p, then a draw from the request's own torch.Generator (seeded when the
request gives a seed). Text is the tokenizer's decode of all generated ids (skip_special_tokens, as
`lorakit generate`); what is streamed is the growth of that text, holding back a trailing partial
character and anything that may still turn out to begin a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def generator(self) -> torch.Generator | None:
        if self.temperature == 0:
            return None
        g = torch.Generator()
        if self.seed is not None:
            g.manual_seed(self.seed)
        else:
            g.seed()
        return g


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row of logits (vocab,)."""
    logits = logits.float()
    if params.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # the smallest prefix reaching top_p (>= 1 token)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class TextTracker:
    """The text of a request's generated ids, what was already sent, and stop-string detection."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.text, self.sent = "", 0
        self.stopped: str | None = None  # the stop string that ended the text

    def update(self, ids: list[int]) -> None:
        """Recompute the text from all ids; cut it at the first stop string found."""
        self.text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [(self.text.find(s), s) for s in self.stop if s in self.text]
        if cuts:
            at, s = min(cuts)
            self.text, self.stopped = self.text[:at], s

    def delta(self, final: bool) -> str:
        """New text safe to send now (everything once `final`)."""
        end = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):  # a multi-byte character not complete yet
                end -= 1
            for s in self.stop:  # a suffix that may be the start of a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if self.text[:end].endswith(s[:k]):
                        end -= k
                        break
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out
