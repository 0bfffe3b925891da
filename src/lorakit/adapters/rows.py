"""Mixed-adapter batches on a model: each row of a batch names its own adapter (or the base).

    with adapter_rows(model, ["a", "b", "__base__", "a"]):   # one name per batch row
        logits = model(input_ids=ids).logits                  # or model.generate(...)

The names are checked here, once, against the model's adapters; the per-layer math is layers/mixed.py.
The plan is per call (a context variable), so threads and asyncio tasks running mixed batches on one
model at once each see their own. The stacked adapter weights are kept per model in one Stacks store
(`stacks(model)`) that every plan reuses, so a server's steps do not re-stack the adapters.
"""

from __future__ import annotations

import contextlib

from torch import nn

from ..errors import LorakitError
from ..layers import BASE, RowPlan, Stacks, using_row_plan
from . import manage

STACKS_ATTR = "lorakit_stacks"


def stacks(model: nn.Module) -> Stacks:
    """The model's store of stacked adapters (created on first use; a plain attribute, not state)."""
    store = model.__dict__.get(STACKS_ATTR)
    if store is None:
        store = model.__dict__.setdefault(STACKS_ATTR, Stacks())
    return store


def row_plan(model: nn.Module, adapter_names: list[str]) -> RowPlan:
    """A checked plan for `model`: batch row i runs adapter adapter_names[i] ("__base__": no adapter)."""
    _check_names(model, adapter_names)
    return RowPlan(adapter_names, stacks(model))


@contextlib.contextmanager
def adapter_rows(model: nn.Module, adapter_names: list[str]):
    """Within this block every LoRA layer of `model` routes batch row i to adapter_names[i]."""
    with using_row_plan(row_plan(model, adapter_names)):
        yield


def _check_names(model: nn.Module, adapter_names) -> None:
    if not isinstance(adapter_names, (list, tuple)) or not adapter_names or \
            not all(isinstance(n, str) for n in adapter_names):
        raise LorakitError(f"adapter_names must be a non-empty list of adapter names, one per batch row "
                           f"(got {adapter_names!r}); use {BASE!r} for rows that run the base model")
    known = manage.configs(model)
    unknown = sorted({n for n in adapter_names if n != BASE and n not in known})
    problems = []
    if unknown:  # PEFT's words first, so code matching them still works
        problems.append(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}: unknown adapter(s) "
                        f"{unknown}; this model has {sorted(known)} "
                        f"(use {BASE!r} for base rows)")
    dora = sorted({n for n in adapter_names if n in known and known[n].use_dora})
    if dora:
        problems.append(f"Cannot pass `adapter_names` when DoRA is enabled: adapter(s) {dora} are "
                        "DoRA; mixed-adapter batches support plain LoRA adapters only: "
                        "run DoRA adapters in their own batch with set_adapter(), or merge them")
    tokens = sorted({n for n in adapter_names if n in known and known[n].trainable_token_indices is not None})
    if tokens:
        problems.append(f"adapter(s) {tokens} train embedding rows (trainable_token_indices), which lorakit does not "
                        "route per batch row; run them in their own batch with set_adapter(), or merge them")
    if any(layer.merged_adapters for _, layer in manage.lora_layers(model)):
        problems.append("Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` "
                        "first (lorakit: unmerge()); mixed-adapter batches need unmerged adapters")
    LorakitError.collect(problems)
