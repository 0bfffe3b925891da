"""The merged transformers folder: the base with its adapters folded in, loadable with transformers alone."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..adapters import manage
from ..errors import LorakitError


def export_hf(model: nn.Module, tokenizer, out: str | Path, quantized: bool = False) -> Path:
    """Merge and save config.json + model.safetensors + tokenizer to `out`. quantized: the base was loaded
    quantized (QLoRA): dequantize and merge exactly in fp32 first."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} is a file; the merged model is a folder (config.json, model.safetensors, "
                           "tokenizer): give a folder path")
    if quantized:
        from ..adapters.quantize import merge_to_full_precision
        model = merge_to_full_precision(model)
    else:
        model = manage.merge_and_unload(model, safe_merge=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if not (out / "config.json").is_file():
        raise LorakitError(f"the merged model was not written to {out} (no config.json there)")
    return out
