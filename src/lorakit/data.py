"""Training data: read records, render them through the chat template, mask the prompt.

A record is one training example in one of four formats, detected from its keys:
  messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  prompt_completion  {"prompt": ..., "completion": ...}
  alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
  text               {"text": ...}
Files: .jsonl, .json (an array), .csv, .parquet (needs pyarrow). All records of a file
share one format.

encode() turns a record into token ids and labels: -100 (no loss) on system and user
turns and on template scaffolding; assistant content and its end-of-turn token carry
loss. Assistant spans are found by rendering prefixes of the conversation with the
tokenizer's own chat template, so any template works. prepare() encodes a whole list,
optionally packs it, and reports statistics. Packing, collation and batch order live in
lorakit.batching and are re-exported here.

Public: load_records, encode, prepare, split_eval, Records, TokenizedDataset, DataStats,
and pack, collate, batches, batch_order, block_causal_mask from lorakit.batching.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from lorakit import batching
from lorakit.batching import IGNORE_INDEX, batch_order, batches, block_causal_mask, collate, pack
from lorakit.errors import LorakitError
from lorakit.records import Records, check_record, load_records, record_format

__all__ = [
    "load_records", "encode", "prepare", "split_eval", "Records", "TokenizedDataset",
    "DataStats", "pack", "collate", "batches", "batch_order", "block_causal_mask",
    "record_format", "IGNORE_INDEX",
]

log = logging.getLogger(__name__)

# The Stanford Alpaca prompt, used when the tokenizer has no chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


# --- encoding one record -------------------------------------------------------------


def encode(record: dict, tokenizer, max_length: int, train_on_prompt: bool = False) -> dict:
    """One record -> {"input_ids": [int], "labels": [int], "truncated": bool}.

    labels[i] == input_ids[i] where token i carries loss, else -100. With
    train_on_prompt every token carries loss. Sequences longer than max_length are cut
    and flagged truncated.
    """
    fmt, problem = check_record(record)
    if problem:
        raise LorakitError(f"record {_preview(record)}: {problem}")
    if not isinstance(max_length, int) or max_length < 2:
        raise LorakitError(f"max_length must be an integer >= 2, got {max_length!r}")
    if fmt == "text":
        ids = _tokens(tokenizer, record["text"], special=True)
        ids = _with_eos(ids, tokenizer)
        labels = list(ids)  # plain text: every token is a target
    elif _has_chat_template(tokenizer):
        ids, labels = _encode_chat(_as_messages(record, fmt), tokenizer)
    elif fmt == "messages":
        raise LorakitError(
            "a 'messages' record needs a tokenizer with a chat template, and this one has "
            "none: set tokenizer.chat_template, or write the data as prompt/completion")
    else:
        prompt, completion = _plain_prompt(record, fmt)
        prompt_ids = _tokens(tokenizer, prompt, special=True)
        completion_ids = _with_eos(_tokens(tokenizer, completion, special=False), tokenizer)
        ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    if train_on_prompt:
        labels = list(ids)
    truncated = len(ids) > max_length
    return {"input_ids": ids[:max_length], "labels": labels[:max_length], "truncated": truncated}


def _as_messages(record: dict, fmt: str) -> list[dict]:
    """Every chat-like format as a list of {"role", "content"} turns."""
    if fmt == "messages":
        return record["messages"]
    if fmt == "prompt_completion":
        user, answer = record["prompt"], record["completion"]
    else:  # alpaca: the optional input follows the instruction after a blank line
        extra = record.get("input") or ""
        user = record["instruction"] + ("\n\n" + extra if extra else "")
        answer = record["output"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _plain_prompt(record: dict, fmt: str) -> tuple[str, str]:
    """(prompt, completion) text for a tokenizer without a chat template."""
    if fmt == "prompt_completion":
        return record["prompt"], record["completion"]
    if record.get("input"):
        return ALPACA_PROMPT.format(**record), record["output"]
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"]), record["output"]


def _encode_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation, and labels on every assistant turn."""
    ids = _render_ids(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] == "assistant":
            start, end = _assistant_span(tokenizer, messages, turn, ids)
            labels[start:end] = ids[start:end]
    return ids, labels


def _assistant_span(tokenizer, messages: list[dict], turn: int, ids: list[int]) -> tuple[int, int]:
    """[start, end) of assistant turn `turn` in `ids`: its content and end-of-turn token.

    start: the conversation before the turn, rendered with the generation prompt (the
    assistant header), is a prefix of the whole conversation; the turn begins after it.
    end: the turn rendered with empty content gives the template's closing tokens
    (ChatML: <|im_end|> "\\n"); loss goes up to and including the first special token of
    them, so the model learns to stop but not the newline the template puts between turns.
    """
    prompt = _render_ids(tokenizer, messages[:turn], generation_prompt=True)
    through = _render_ids(tokenizer, messages[: turn + 1], generation_prompt=False)
    start = _common_prefix(prompt, ids)  # == len(prompt) for any prefix-stable template
    stop = _common_prefix(through, ids)  # == len(through)
    empty_turn = messages[:turn] + [{**messages[turn], "content": ""}]
    empty = _render_ids(tokenizer, empty_turn, generation_prompt=False)
    closing = empty[len(prompt):] if empty[: len(prompt)] == prompt else None
    special = _special_ids(tokenizer)
    if closing and through[stop - len(closing): stop] == closing:
        learned = next((k + 1 for k, t in enumerate(closing) if t in special), len(closing))
        return start, min(stop, stop - len(closing) + learned)
    # Closing tokens merged with the content: stop at the first special token instead.
    end = next((k + 1 for k in range(start, stop) if ids[k] in special), stop)
    return start, end


def _render_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    """Render through the chat template, then tokenise (the template adds any BOS itself)."""
    if not messages and not generation_prompt:
        return []
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as err:  # jinja raises TemplateError, e.g. "roles must alternate"
        raise LorakitError(
            f"the tokenizer's chat template rejected a conversation ({err}); "
            f"check the roles and their order in 'messages'") from None
    return _tokens(tokenizer, text, special=False)


def _tokens(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _with_eos(ids: list[int], tokenizer) -> list[int]:
    """Append eos so the model learns where a completion or document ends."""
    eos = tokenizer.eos_token_id
    if eos is None or (ids and ids[-1] == eos):
        return ids
    return ids + [eos]


def _special_ids(tokenizer) -> set[int]:
    """Ids of special tokens (eos, <|im_end|>, <|eot_id|>, ...), the end-of-turn markers."""
    ids = set(tokenizer.all_special_ids)
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _preview(record) -> str:
    text = repr(record)
    return text if len(text) <= 60 else text[:57] + "..."


# --- a whole dataset -----------------------------------------------------------------


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
