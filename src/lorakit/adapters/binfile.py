"""adapter_model.bin: PEFT's file for save_pretrained(safe_serialization=False), written and read safely.

PEFT writes the adapter's {key: tensor} dict with torch.save (a zip holding a pickle). We write the same
(atomically) and read it only with torch.load(weights_only=True): torch's restricted unpickler, which
rebuilds tensors, storages and plain containers (dict, list, tuple, str, int, float, ...) and refuses
every other global, so loading a file never imports or calls code named by the file. What comes back
must then be a flat dict of str -> tensor, as PEFT writes; anything else (a pickled object that
weights_only refuses, a number, a nested dict) is a LorakitError naming the file and what is in it.
adapter_model.safetensors stays the default and is preferred when a folder holds both (as in PEFT).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..errors import LorakitError

BIN_NAME = "adapter_model.bin"


def write_bin(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """torch.save the {key: tensor} dict to `path` atomically (a reader sees the old file or the new one)."""
    atomic_write(path, lambda p: torch.save(tensors, p))


def read_bin(path: str | Path) -> dict[str, torch.Tensor]:
    """The {key: tensor} dict of an adapter_model.bin, loaded with weights_only=True (never arbitrary objects)."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # weights_only refused to rebuild an object: the file holds more than tensors
            raise LorakitError(f"{path} holds a pickled object ({found.group(1)}), not only tensors; lorakit never "
                               "unpickles objects (it reads .bin files with torch.load(weights_only=True)). An "
                               "adapter file holds only tensors: re-save the adapter from a trusted source "
                               "(save_pretrained, preferably as safetensors)") from None
        raise LorakitError(f"{path} is not a readable torch.save file of tensors (torch.load(weights_only=True) "
                           "refused it; lorakit never unpickles objects); re-save the adapter") from None
    except Exception as e:  # noqa: BLE001 - a truncated or non-torch file: torch raises RuntimeError and others
        raise LorakitError(f"{path} is not a readable torch.save file ({type(e).__name__}: {str(e)[:200]}); "
                           "re-save the adapter") from None
    if not isinstance(state, dict):
        raise LorakitError(f"{path} holds a {type(state).__name__}, not a dict of tensors as an adapter file does; "
                           "re-save the adapter with save_pretrained")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state.items() if not (isinstance(k, str)
                                                                             and isinstance(v, torch.Tensor))]
    if bad:
        raise LorakitError(f"{path} holds {len(bad)} value(s) that are not tensors under string keys, e.g. "
                           f"{bad[:3]}; an adapter file holds only tensors: re-save the adapter")
    return state
