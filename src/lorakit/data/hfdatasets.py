"""Sources read through the `datasets` library (pip install 'lorakit[datasets]'):

    a directory written by Dataset.save_to_disk / DatasetDict.save_to_disk   load_from_disk (memory-mapped:
                                                                            rows are read one at a time)
    a .arrow file (Dataset.from_file, memory-mapped)
    hf:org/name[:split]   a dataset on the Hugging Face Hub, streamed (never downloaded whole); needs a
                          network: never used by the tests or the demo

Each yields (where, record, None) like records._read's readers; records.load_records checks them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..errors import LorakitError


def is_source(path: str) -> bool:
    """True for what this module reads (checked before a path must be a file)."""
    return path.startswith("hf:") or Path(path).is_dir() or path.lower().endswith(".arrow")


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise LorakitError(f"{what} is read with the datasets library: pip install 'lorakit[datasets]'") from None
    return datasets


def read(path: str) -> Iterator[tuple[str, dict, None]]:
    if path.startswith("hf:"):
        return _read_hub(path)
    ds = _datasets(path)
    if path.lower().endswith(".arrow"):
        if not Path(path).is_file():
            raise LorakitError(f"dataset file '{path}' does not exist: check the path")
        table = ds.Dataset.from_file(path)
    else:
        try:
            table = ds.load_from_disk(path)
        except FileNotFoundError:
            raise LorakitError(f"{path} is a directory but not one written by datasets' save_to_disk: give a "
                               "data file, or save the dataset with Dataset.save_to_disk") from None
        if isinstance(table, ds.DatasetDict):
            if "train" not in table:
                raise LorakitError(f"{path} holds splits {sorted(table)}: give the split's folder, "
                                   f"e.g. {Path(path) / sorted(table)[0]}")
            table = table["train"]
    return ((f"{path}: row {i}", row, None) for i, row in enumerate(table, start=1))


def _read_hub(path: str) -> Iterator[tuple[str, dict, None]]:
    name, _, split = path[3:].partition(":")
    if not name:
        raise LorakitError(f"{path!r}: write hf:org/name or hf:org/name:split")
    ds = _datasets(path)
    stream = ds.load_dataset(name, split=split or "train", streaming=True)
    return ((f"{path}: row {i}", row, None) for i, row in enumerate(stream, start=1))
