"""Encoding one record: render it through the chat template and mask the prompt.

encode() turns a record into token ids and labels: -100 (no loss) on system and user turns and on
template scaffolding; assistant content and its end-of-turn token carry loss. Assistant spans are
found by rendering prefixes of the conversation with the tokenizer's own chat template, so any
template works. A tokenizer without a chat template gets the Alpaca prompt for instruction records
and prompt + completion as plain text.
"""

from __future__ import annotations

from ..errors import LorakitError
from .batching import IGNORE_INDEX
from .records import as_messages, check_record

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
        ids, labels = _encode_chat(as_messages(record), tokenizer)
    elif fmt in ("messages", "sharegpt"):
        raise LorakitError(
            f"a {fmt!r} record needs a tokenizer with a chat template, and this one has "
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
