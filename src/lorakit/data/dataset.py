"""A whole dataset: encode every record, drop what carries no loss, pack, report statistics."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import LorakitError
from . import batching
from .batching import IGNORE_INDEX
from .encode import encode
from .records import check_record

log = logging.getLogger(__name__)



@dataclass
class DataStats:
    """What prepare() made of the records; `tokens` and `loss_tokens` count kept rows."""

    examples: int  # examples kept (each record is one example)
    truncated: int  # examples cut at max_length
    dropped: int  # examples with no loss-carrying token left (e.g. truncated away): removed
    tokens: int  # tokens in all rows
    loss_tokens: int  # tokens whose label is not -100
    rows: int  # rows the trainer sees: examples, or fewer when packed

    def summary(self) -> str:
        share = self.loss_tokens / max(self.tokens, 1)
        return (f"{self.examples} examples in {self.rows} rows, {self.tokens} tokens "
                f"({self.loss_tokens} with loss, {share:.0%}), {self.truncated} truncated, "
                f"{self.dropped} dropped")


class TokenizedDataset(Sequence):
    """Encoded rows (dicts of input_ids, labels, and position_ids when packed) + stats."""

    def __init__(self, rows: list[dict], stats: DataStats, pad_id: int, max_length: int,
                 packed: bool):
        self.rows, self.stats, self.pad_id = rows, stats, pad_id
        self.max_length, self.packed = max_length, packed

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]

    @property
    def lengths(self) -> list[int]:
        return [len(row["input_ids"]) for row in self.rows]

    def __repr__(self) -> str:
        return f"TokenizedDataset({self.stats.summary()})"


def prepare(records: Sequence[dict], tokenizer, max_length: int, train_on_prompt: bool = False,
            pack: bool = False) -> TokenizedDataset:
    """Encode every record; optionally pack short ones into rows of max_length tokens.

    Bad records raise one LorakitError listing them. Truncated examples are counted and
    logged; examples left without any loss-carrying token are dropped and counted.
    """
    pad_id = _pad_id(tokenizer)
    problems = [f"record {i}: {p}" for i, r in enumerate(records) if (p := check_record(r)[1])]
    LorakitError.collect(problems[:10] + _more(len(problems) - 10),
                         f"{len(problems)} bad records passed to prepare():")
    encoded = [encode(r, tokenizer, max_length, train_on_prompt) for r in records]
    kept = [e for e in encoded if any(t != IGNORE_INDEX for t in e["labels"])]
    n_truncated = sum(e["truncated"] for e in encoded)
    if n_truncated:
        log.warning("%d of %d examples are longer than max_length=%d and were cut; raise "
                    "max_length to keep them whole", n_truncated, len(encoded), max_length)
    if len(kept) < len(encoded):
        log.warning("%d examples have no token left to learn from and were dropped",
                    len(encoded) - len(kept))
    if not kept:
        raise LorakitError("no example carries any loss: check the data, or raise max_length")
    examples = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in kept]
    rows = batching.pack(examples, max_length) if pack else examples
    stats = DataStats(
        examples=len(kept), truncated=n_truncated, dropped=len(encoded) - len(kept),
        tokens=sum(len(r["input_ids"]) for r in rows),
        loss_tokens=sum(t != IGNORE_INDEX for r in rows for t in r["labels"]), rows=len(rows))
    return TokenizedDataset(rows, stats, pad_id, max_length, packed=pack)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise LorakitError("the tokenizer has neither a pad nor an eos token: set "
                           "tokenizer.pad_token (load_model does this for you)")
    return pad


def _more(n: int) -> list[str]:
    return [f"... and {n} more"] if n > 0 else []


def split_eval(records: Sequence[dict], fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, eval): a random `fraction` of the records held out, same for a seed.

    Both keep the records' original order. fraction 0 gives an empty eval set.
    """
    if not 0 <= fraction < 1:
        raise LorakitError(f"eval fraction must be in [0, 1), got {fraction}")
    n = len(records)
    n_eval = 0 if fraction == 0 else max(1, round(n * fraction))
    if n_eval >= n and n_eval > 0:
        raise LorakitError(f"eval fraction {fraction} of {n} records leaves nothing to "
                           f"train on: lower the fraction or add records")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    train = [r for i, r in enumerate(records) if i not in held]
    return train, [r for i, r in enumerate(records) if i in held]
