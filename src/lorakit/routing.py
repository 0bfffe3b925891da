"""Mixed-adapter batches: each row of a batch names its own adapter (or the base), one forward.

    with adapter_rows(model, ["a", "b", "__base__", "a"]):   # one name per batch row
        logits = model(input_ids=ids).logits                  # or model.generate(...)

The base matmul runs once for the whole batch; only the low-rank part differs per row. Two ways to
add that part, both exact:

  stacked  (the default) Per layer, the plain adapters are stacked once, side by side: slot k holds
           A_k as (in, r_max) and s_k·B_k as (r_max, out) (scaling folded in, smaller ranks zero-
           padded); the last slot is all zeros, for "__base__" rows and adapters that skip the layer.
           A forward gathers each row's slot (one index_select) and runs two batched matmuls:
           (B, T, in) @ (B, in, r) -> (B, T, r) @ (B, r, out), added into the base output in place.
           No Python loop over adapters; the cost does not grow with how many adapters are loaded.
           The stack is rebuilt when an adapter is added or removed or a used A or B changes (tensor
           version counters and data pointers tell, as for the DoRA norm cache in variants.py).
           Embeddings look up a stacked table instead of gathering A. The gathered factors are kept
           for the block's next forwards (decoding steps) while small (GATHER_CACHE_BYTES a layer).
  segments (fallback) Rows grouped by adapter; per layer a loop over the distinct adapters present,
           index_select / index_add. Used where the stack cannot be: gradients flowing into the
           adapters (training on mixed batches), dropout in training mode, embeddings with max_norm.

Measured (benchmarks/bench_multi.py, tests of one layer): the stacked path is as fast as or faster
than the segments for any number of adapters, prefill and decoding alike, so it is the default.
The row-to-adapter mapping holds for every forward inside the block, so `generate` (KV cache, left
padding) works as long as the batch size stays constant (no beams, one sequence per prompt).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters, layers
from .errors import LorakitError

BASE = "__base__"


# A plan keeps each layer's gathered per-row factors for the next forward (generate's decoding steps)
# when they take at most this many bytes per layer; larger batches gather on every forward instead.
GATHER_CACHE_BYTES = 4 << 20


class RowPlan:
    """Which adapter each batch row uses; per layer, the rows' slots (and factors) cached on first use."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.n = len(self.names)
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            groups.setdefault(name, []).append(i)
        self.groups = {name: torch.tensor(ix) for name, ix in groups.items() if name != BASE}
        self._layers: dict[int, tuple] = {}  # id(layer) -> (stack, device, index (B,), gathered or None)

    def gather(self, layer: nn.Module, stack: "Stack", device: torch.device):
        """(index (B,), A_sel (B, in, r) or None for embeddings, B_sel (B, r, out)) for this layer's stack.

        One index_select over the packed factors per layer (small ops are what a mixed batch adds to
        the base forward, so there are as few as possible), cached for the next forwards when small.
        """
        hit = self._layers.get(id(layer))
        if hit is not None and hit[0] is stack and hit[1] == device:
            index, gathered = hit[2], hit[3]
        else:
            position = {name: k for k, name in enumerate(stack.names)}
            index = torch.tensor([position.get(name, len(stack.names)) for name in self.names], device=device)
            gathered = None
        if gathered is None:
            rows = stack.packed.index_select(0, index)  # (B, in·r + r·out)
            A_sel = rows[:, :stack.split].view(len(index), -1, stack.r) if stack.table is None else None
            gathered = (A_sel, rows[:, stack.split:].view(len(index), stack.r, -1))  # (B, in, r), (B, r, out)
            small = rows.numel() * rows.element_size() <= GATHER_CACHE_BYTES
            self._layers[id(layer)] = (stack, device, index, gathered if small else None)
        return index, *gathered


@contextlib.contextmanager
def adapter_rows(model: nn.Module, adapter_names: list[str]):
    """Within this block every LoRA layer of `model` routes batch row i to adapter_names[i]."""
    _check_names(model, adapter_names)
    previous = layers._ROWS[0]
    layers._ROWS[0] = RowPlan(adapter_names)
    try:
        yield
    finally:
        layers._ROWS[0] = previous


def _check_names(model: nn.Module, adapter_names) -> None:
    if not isinstance(adapter_names, (list, tuple)) or not adapter_names or \
            not all(isinstance(n, str) for n in adapter_names):
        raise LorakitError(f"adapter_names must be a non-empty list of adapter names, one per batch row "
                           f"(got {adapter_names!r}); use {BASE!r} for rows that run the base model")
    known = adapters.configs(model)
    unknown = sorted({n for n in adapter_names if n != BASE and n not in known})
    problems = []
    if unknown:
        problems.append(f"adapter_names holds unknown adapter(s) {unknown}; this model has {sorted(known)} "
                        f"(use {BASE!r} for base rows)")
    dora = sorted({n for n in adapter_names if n in known and known[n].use_dora})
    if dora:
        problems.append(f"adapter(s) {dora} are DoRA; mixed-adapter batches support plain LoRA adapters only: "
                        "run DoRA adapters in their own batch with set_adapter(), or merge them")
    if any(layer.merged_adapters for _, layer in adapters.lora_layers(model)):
        problems.append("mixed-adapter batches need unmerged adapters; call unmerge() (PeftModel: "
                        "unmerge_adapter()) first")
    LorakitError.collect(problems)


def mixed_forward(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, plan: RowPlan) -> torch.Tensor:
    """result (B, ..., out) plus, for each row, the low-rank output of that row's adapter."""
    if x.shape[0] != plan.n:
        raise LorakitError(f"adapter_names has {plan.n} entries but the batch has {x.shape[0]} rows; give one "
                           "adapter name per row (generate with num_beams or num_return_sequences > 1 grows the "
                           "batch: repeat each name that many times)")
    present = [name for name in plan.groups if name in layer.r]  # layer.r: a plain dict, a fast lookup
    if not present:
        return result
    if _can_stack(layer, present):
        return _stacked_forward(layer, x, result, plan, present)
    return _segment_forward(layer, x, result, plan, present)


def _can_stack(layer: nn.Module, present: list[str]) -> bool:
    """The stacked path holds no autograd graph and applies no dropout; it needs neither here."""
    if layer.kind == "embedding" and layer.base_layer.max_norm is not None:
        return False
    if not torch.is_grad_enabled() and not layer.training:
        return True
    for name in present:
        if torch.is_grad_enabled() and (layer.lora_A[name].requires_grad or layer.lora_B[name].requires_grad):
            return False
        if layer.training and not isinstance(layer.lora_dropout[name], nn.Identity):
            return False
    return True


def _check_plain(layer: nn.Module, names: list[str]) -> None:
    dora = [name for name in names if name in layer.lora_magnitude_vector]
    if dora:
        raise LorakitError(f"adapter {dora[0]!r} is DoRA; mixed-adapter batches support plain LoRA adapters only")


# -- stacked: gather each row's factors, two batched matmuls ---------------------------------------------

def _version(A: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple:
    """Changes whenever an adapter's A, B (in place or through .data) or scaling does."""
    return A.data_ptr(), A._version, B.data_ptr(), B._version, scaling


def _unchanged(layer: nn.Module, versions: dict, name: str) -> bool:
    hit = versions.get(name)  # (A, B, version) as stacked; tensors kept to skip nn.Module lookups
    return hit is not None and _version(hit[0], hit[1], layer.scaling[name]) == hit[2]


class Stack(NamedTuple):
    """A layer's plain adapters side by side (see _stack)."""

    names: tuple  # slot k holds adapter names[k]; slot len(names) is all zeros
    packed: torch.Tensor  # (N+1, in·r + r·out): per slot A (in, r) then s·B (r, out), flattened
    split: int  # in·r, where B starts in a packed row (0 for embeddings: A is the table)
    r: int  # r_max; smaller ranks are zero-padded
    table: torch.Tensor | None  # embeddings: ((N+1)·num_embeddings, r), row k·num + id = A_k[:, id]


def _stack(layer: nn.Module, used: list[str]) -> Stack:
    """The layer's plain adapters stacked, rebuilt when adapters come or go or a used one changed.

    Only the adapters this batch uses are checked for changes (a stale unused slot is never read; it
    is caught when a later batch uses it), so the check costs O(adapters in the batch), not O(N).
    """
    hit = layer._stack_cache.get("stack")  # LoraLayer.add / delete clear it
    if hit is not None and all(_unchanged(layer, hit[1], n) for n in used):
        return hit[0]
    _check_plain(layer, used)
    names = tuple(n for n in layer.lora_A if n not in layer.lora_magnitude_vector)
    first = layer.lora_A[names[0]]
    r_max, n_in, n_out = max(layer.r[n] for n in names), layer.in_features, layer.out_features
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, reusable outside inference mode
        A_all = first.new_zeros(len(names) + 1, n_in, r_max)  # (N+1, in, r_max)
        B_all = first.new_zeros(len(names) + 1, r_max, n_out)  # (N+1, r_max, out)
        for k, n in enumerate(names):
            r = layer.r[n]
            A_all[k, :, :r] = layer.lora_A[n].T  # (in, r)
            B_all[k, :r, :] = (layer.lora_B[n] * layer.scaling[n]).T  # (r, out)
        if layer.kind == "embedding":
            stack = Stack(names, B_all.flatten(1), 0, r_max, A_all.reshape(-1, r_max))
        else:
            packed = torch.cat([A_all.flatten(1), B_all.flatten(1)], dim=1)  # (N+1, in·r + r·out)
            stack = Stack(names, packed, n_in * r_max, r_max, None)
    versions = {}
    for n in names:
        A, B = layer.lora_A[n], layer.lora_B[n]
        versions[n] = (A, B, _version(A, B, layer.scaling[n]))
    layer._stack_cache["stack"] = (stack, versions)
    return stack


def _stacked_forward(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, plan: RowPlan,
                     present: list[str]) -> torch.Tensor:
    stack = _stack(layer, present)
    index, A_sel, B_sel = plan.gather(layer, stack, x.device)  # (B,), (B, in, r), (B, r, out)
    n_rows = x.shape[0]
    if layer.kind == "embedding":
        shift = (index * layer.in_features).view(-1, *([1] * (x.dim() - 1)))  # (B, 1, ...)
        after_A = F.embedding(x + shift, stack.table).reshape(n_rows, -1, stack.r)  # (B, T, r)
    else:
        xs = x.reshape(n_rows, -1, x.shape[-1]).to(A_sel.dtype)  # (B, T, in)
        after_A = torch.bmm(xs, A_sel)  # (B, T, r)
    out = result.reshape(n_rows, -1, result.shape[-1])  # (B, T, out), a view
    if out.dtype == after_A.dtype and not torch.is_grad_enabled() and out.is_contiguous():
        out.baddbmm_(after_A, B_sel)  # result += per-row low-rank output, in place
        return result
    return (out + torch.bmm(after_A, B_sel).to(out.dtype)).view_as(result)


# -- segments: loop over the adapters present -----------------------------------------------------------

def _segment_forward(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, plan: RowPlan,
                     present: list[str]) -> torch.Tensor:
    _check_plain(layer, present)
    out_dtype = result.dtype
    result = result.clone()
    for name in present:
        index = plan.groups[name].to(x.device)
        sub_x = x.index_select(0, index)
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        if layer.kind == "embedding":
            delta = (layer._embed(sub_x, A.T) @ B.T) * s  # (b, T, out)
        else:
            delta = F.linear(F.linear(layer.lora_dropout[name](sub_x.to(A.dtype)), A), B) * s  # (b, T, out)
        result.index_add_(0, index, delta.to(result.dtype))
    return result.to(out_dtype)
