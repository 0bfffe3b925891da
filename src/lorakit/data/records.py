"""Read training records from a file and check each one before any tokenising.

Files: .jsonl / .ndjson (one JSON object a line), .json (an array of objects, or JSONL
under a .json name), .csv (a header row names the fields), .parquet (needs pyarrow); a folder saved
with the datasets library, a .arrow file and hf:org/name[:split] through hfdatasets.py.
Every record is checked for its format (see lorakit.data) and field types; problems are
reported as `file:line: problem (field 'x')`, all at once, or skipped and counted.

Public: load_records, Records, check_record, record_format, as_messages.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from ..errors import LorakitError
from . import hfdatasets

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
_SHOWN = 10  # bad records listed in one error; the rest are counted
# ShareGPT's `conversations` turns ({"from", "value"}) -> roles; human/gpt as ShareGPT writes them
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool"}
_FORMAT_HELP = ("expected one of: 'messages'; 'conversations' (ShareGPT: from/value turns); 'prompt' + 'completion'; "
                "'instruction' + 'output' (+ optional 'input', Alpaca); 'text'")


class Records(list):
    """A list of record dicts, plus the file's format and what was skipped (on_error='skip')."""

    def __init__(self, items=(), path: str = "", format: str | None = None,
                 skipped: list[str] | None = None):
        super().__init__(items)
        self.path, self.format = path, format
        self.skipped_problems = skipped or []  # "file:line: problem" for each skipped record

    @property
    def skipped(self) -> int:
        return len(self.skipped_problems)


def load_records(path, on_error: str = "fail") -> Records:
    """Read and check every record of a dataset file.

    on_error="fail": any bad record raises one LorakitError listing the first ten as
    `file:line: problem`, and how many more. on_error="skip": bad records are left out,
    logged, and counted in the result's `.skipped` (their messages in `.skipped_problems`).
    """
    if on_error not in ("fail", "skip"):
        raise LorakitError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if hfdatasets.is_source(str(path)):
        rows = hfdatasets.read(str(path))
    else:
        path = Path(path)
        if not path.is_file():
            raise LorakitError(f"dataset file '{path}' does not exist: check the path")
        rows = _read(path)
    path = Path(path)
    good, problems, file_format = [], [], None
    for where, record, problem in rows:
        fmt = None
        if problem is None:
            fmt, problem = check_record(record)
        if problem is None and file_format and fmt != file_format[0]:
            problem = (f"format '{fmt}' differs from the file's first record "
                       f"({file_format[1]}, '{file_format[0]}'): use one format per file")
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        file_format = file_format or (fmt, where)
        good.append(record)
    _report(path, problems, on_error, n_good=len(good))
    return Records(good, str(path), file_format[0], skipped=problems)


def _report(path: Path, problems: list[str], on_error: str, n_good: int) -> None:
    """Raise (fail), or log (skip) the bad records; no good record at all always raises."""
    shown = problems[:_SHOWN] + ([f"... and {len(problems) - _SHOWN} more"]
                                 if len(problems) > _SHOWN else [])
    if problems and on_error == "fail":
        LorakitError.collect(shown, f"{path}: {len(problems)} bad records (fix them, or "
                                    f"load with on_error='skip' to leave them out):")
    if problems:
        log.warning("%s: skipped %d bad records, first: %s", path, len(problems), problems[0])
    if n_good == 0:
        raise LorakitError(f"{path}: no usable records" + (
            f" ({len(problems)} bad, first: {problems[0]})" if problems else " (file is empty)"))


def _read(path: Path) -> Iterator[tuple[str, object, str | None]]:
    """(where, record, parse problem or None) for each record of the file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise LorakitError(f"{path}: unknown dataset file type '{suffix}': use .jsonl, .json, "
                       f".csv or .parquet")


def _read_text(path: Path) -> str:
    """The file as text; a file that is not UTF-8 is an error naming the line and column of the first bad
    byte. (utf-8-sig: files saved by some editors start with a byte-order mark.)"""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise LorakitError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); save "
                           "the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def _read_jsonl(path: Path, text: str | None = None):
    text = _read_text(path) if text is None else text
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (a trailing newline, spacing) are not records
        try:
            yield f"{path}:{number}", json.loads(line), None
        except json.JSONDecodeError as err:
            yield f"{path}:{number}", None, f"invalid JSON ({err.msg}, column {err.colno})"


def _read_json(path: Path):
    """A JSON array of records; each is located by the line its object starts on."""
    text = _read_text(path)
    start = len(text) - len(text.lstrip())
    if text[start:start + 1] == "{":  # JSON Lines saved under a .json name, or one object
        _refuse_one_object(path, text)
        yield from _read_jsonl(path, text)
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise LorakitError(f"{path}:{err.lineno}: invalid JSON ({err.msg}, column "
                           f"{err.colno}); the whole file must parse as one array") from None
    if not isinstance(items, list):
        raise LorakitError(f"{path}: expected a JSON array of records, got a "
                           f"{type(items).__name__}")
    for line, item in zip(_array_item_lines(text), items):
        yield f"{path}:{line}", item, None


def _refuse_one_object(path: Path, text: str) -> None:
    """A .json file that is one JSON object ({"data": [...]}, a pretty-printed record) is not JSON Lines."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return  # several objects: JSON Lines
    lines = [line for line in text.splitlines() if line.strip()]
    if isinstance(whole, dict) and (len(lines) > 1 or record_format(whole) is None):
        raise LorakitError(f"{path}: holds one JSON object (keys {sorted(whole)[:5]}), not an array of records: put "
                           "the records in a list [{...}, {...}], or one per line in a .jsonl file")


def _array_item_lines(text: str) -> Iterator[int]:
    """Line number where each top-level element of a (valid) JSON array starts."""
    decoder, pos = json.JSONDecoder(), text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        yield text.count("\n", 0, pos) + 1
        _, pos = decoder.raw_decode(text, pos)


def _read_csv(path: Path):
    """A header row names the fields; every cell is a string (an empty cell is "")."""
    with io.StringIO(_read_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        line = reader.line_num + 1
        for row in reader:
            record = {k: v for k, v in row.items() if k is not None and v is not None}
            extra = row.get(None)  # cells beyond the header
            problem = f"{len(extra)} more cells than the header has columns" if extra else None
            yield f"{path}:{line}", record, problem
            line = reader.line_num + 1  # a quoted cell may span lines


def _read_parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LorakitError(f"{path}: reading .parquet needs pyarrow: `pip install pyarrow`, "
                           f"or convert the file to .jsonl") from None
    for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield f"{path}: row {number}", record, None


# --- one record ------------------------------------------------------------------------


def record_format(record) -> str | None:
    """'messages', 'sharegpt', 'prompt_completion', 'alpaca' or 'text' by the record's keys, else None."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "instruction" in record or "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    return None


def as_messages(record: dict) -> list[dict]:
    """A chat-like record (messages, prompt/completion, alpaca) as a list of {"role", "content"} turns:
    the one mapping from record formats to conversations (training and evaluation share it)."""
    fmt = record_format(record)
    if fmt == "messages":
        return record["messages"]
    if fmt == "sharegpt":
        return _sharegpt_messages(record["conversations"])
    if fmt == "prompt_completion":
        user, answer = record["prompt"], record["completion"]
    elif fmt == "alpaca":  # the optional input follows the instruction after a blank line
        extra = record.get("input") or ""
        user = record["instruction"] + ("\n\n" + extra if extra else "")
        answer = record["output"]
    else:
        raise LorakitError(f"a {fmt!r} record is not a conversation: use messages, prompt/completion or "
                           "instruction/output records")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def check_record(record) -> tuple[str | None, str | None]:
    """(format, problem): problem is None for a usable record, else what to fix."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got {type(record).__name__}"
    fmt = record_format(record)
    if fmt is None:
        return None, f"unknown format, fields {sorted(record)}: {_FORMAT_HELP}"
    required = {"messages": (), "sharegpt": (), "prompt_completion": ("prompt", "completion"),
                "alpaca": ("instruction", "output"), "text": ("text",)}[fmt]
    for field in required:
        problem = _check_text(record, field, may_be_empty=(field == "prompt"))
        if problem:
            return fmt, problem
    if fmt == "alpaca" and "input" in record and not isinstance(record["input"], str):
        return fmt, f"field 'input' must be a string, got {type(record['input']).__name__}"
    if fmt == "messages":
        return fmt, _check_messages(record["messages"])
    if fmt == "sharegpt":
        return fmt, _check_sharegpt(record["conversations"])
    return fmt, None


def _sharegpt_messages(turns: list[dict]) -> list[dict]:
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def _check_sharegpt(turns) -> str | None:
    """ShareGPT turns: {"from": human | gpt | system | ..., "value": text}; then the conversation's rules."""
    if not isinstance(turns, list) or not turns:
        return "field 'conversations' must be a non-empty list of {'from', 'value'} objects"
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"field 'conversations[{i}]' must be an object, got {type(turn).__name__}"
        if turn.get("from") not in SHAREGPT_ROLES:
            return f"field 'conversations[{i}].from' is {turn.get('from')!r}: use one of {sorted(SHAREGPT_ROLES)}"
        if not isinstance(turn.get("value"), str):
            return f"field 'conversations[{i}].value' must be a string, got {type(turn.get('value')).__name__}"
    problem = _check_messages(_sharegpt_messages(turns))
    return problem.replace("'messages", "'conversations").replace(".role'", ".from'").replace(".content'", ".value'") \
        if problem else None


def _check_text(record: dict, field: str, may_be_empty: bool = False) -> str | None:
    if field not in record:
        return f"missing field '{field}'"
    value = record[field]
    if not isinstance(value, str):
        return f"field '{field}' must be a string, got {type(value).__name__}"
    if not value.strip() and not may_be_empty:
        return f"field '{field}' is empty"
    return None


def _check_messages(messages) -> str | None:
    """A conversation: a list of {role, content} starting with a non-assistant turn and
    holding at least one assistant turn with content to learn."""
    if not isinstance(messages, list) or not messages:
        return "field 'messages' must be a non-empty list of {'role', 'content'} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"field 'messages[{i}]' must be an object, got {type(message).__name__}"
        if message.get("role") not in ROLES:
            return f"field 'messages[{i}].role' is {message.get('role')!r}: use one of {ROLES}"
        problem = _check_text(message, "content", may_be_empty=message["role"] != "assistant")
        if problem:
            return problem.replace("field '", f"field 'messages[{i}].", 1)
    if messages[0]["role"] == "assistant":
        return "field 'messages[0].role' is 'assistant': start with a 'system' or 'user' turn"
    if not any(m["role"] == "assistant" for m in messages):
        return "field 'messages' has no 'assistant' turn: nothing to learn from"
    return None
