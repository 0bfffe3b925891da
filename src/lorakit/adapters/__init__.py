"""Adapters on a model: find and wrap targets, manage named adapters, files in PEFT's format.

    inject.py    find the modules a config targets, wrap them with LoraLayer, unwrap (ModulesToSave too)
    manage.py    add / set / disable / delete / merge / unload named adapters; parameter reports
    files.py     adapter folders in PEFT's format (keys, config, safetensors; never pickle)
    rows.py      mixed-adapter batches on a model: adapter_rows, the per-model stacks
    quantize.py  QLoRA at the model level: merge into an exact full-precision model
    trainable_tokens.py  train only chosen embedding rows (PEFT's trainable_token_indices), tied heads too
"""

from .files import adapter_state_dict, load_adapter, load_weights, read_adapter, save_adapter
from .inject import ModulesToSave, find_targets, unwrap, wrap
from .manage import (active_adapters, add_adapter, configs, count_parameters, delete_adapter, disable_adapters,
                     lora_layers, merge, merge_and_unload, set_adapter, trainable_report, unload, unmerge)
from .quantize import merge_to_full_precision
from .rows import adapter_rows
from .trainable_tokens import TokenLayer, TokenWrapper

__all__ = ["ModulesToSave", "TokenLayer", "TokenWrapper", "active_adapters", "adapter_rows", "adapter_state_dict", "add_adapter", "configs",
           "count_parameters", "delete_adapter", "disable_adapters", "find_targets", "load_adapter",
           "load_weights", "lora_layers", "merge", "merge_and_unload", "merge_to_full_precision", "read_adapter",
           "save_adapter", "set_adapter", "trainable_report", "unload", "unmerge", "unwrap", "wrap"]
