"""Combining adapters: weighted sums, negation, SVD re-ranking, TIES and DARE.

    arithmetic.py  the math, on plain tensors (factors A, B and their scaling)
    modules.py     module by module: sources -> the new adapter's factors, config and report
    model.py       on a model: add_weighted_adapter (PEFT's), combine_adapters, negate_adapter
    folders.py     on adapter folders, without the base model: combine_adapter_dirs
"""

from .folders import combine_adapter_dirs
from .model import add_weighted_adapter, combine_adapters, negate_adapter
from .modules import CombineReport

__all__ = ["CombineReport", "add_weighted_adapter", "combine_adapter_dirs", "combine_adapters", "negate_adapter"]
