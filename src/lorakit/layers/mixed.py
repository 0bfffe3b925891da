"""Mixed-adapter forwards: each row of a batch runs its own adapter (or the base), in one forward.

A RowPlan says which adapter each batch row uses; layer.using_row_plan(plan) hands it to every
LoraLayer forward in this thread or task (a context variable: two threads with different plans on one
model never see each other's). The layer calls plan.apply(layer, x, result). The base matmul runs once
for the whole batch; only the low-rank part differs per row. Two ways to add that part, both exact:

  stacked  (the default) Per layer, the plain adapters are stacked once, side by side: slot k holds
           A_k as (in, r_max) and s_k·B_k as (r_max, out) (scaling folded in, smaller ranks zero-
           padded); the last slot is all zeros, for "__base__" rows and adapters that skip the layer.
           A forward gathers each row's slot (one index_select) and runs two batched matmuls:
           (B, T, in) @ (B, in, r) -> (B, T, r) @ (B, r, out), added into the base output in place.
           No Python loop over adapters; the cost does not grow with how many adapters are loaded.
           Embeddings look up a stacked table instead of gathering A. The gathered factors are kept
           by the plan for its next forwards (decoding steps) while small (GATHER_CACHE_BYTES a layer).
  segments (fallback) Rows grouped by adapter; per layer a loop over the distinct adapters present,
           index_select / index_add. Used where the stack cannot be: gradients flowing into the
           adapters (training on mixed batches), dropout in training mode, embeddings with max_norm.

The stacks live in a Stacks store that the caller owns (adapters/rows.py keeps one per model, so that
every plan and thread reuses them), not on the layer. A stack is valid for the layer's set of adapters
(layer.generation) and, per used adapter, for frozen A and B with unchanged data pointers and version
counters. A stack holding a trainable adapter is not kept in the store, since optimizers may change
weights without bumping version counters (torch's fused AdamW does not): it is built once per plan,
for the forwards of one adapter_rows block, inside which the weights are taken as fixed.

Measured (benchmarks/bench_multi.py): the stacked path is as fast as or faster than the segments for
any number of adapters, prefill and decoding alike, so it is the default. The row-to-adapter mapping
holds for every forward inside the block, so `generate` (KV cache, left padding) works as long as the
batch size stays constant (no beams, one sequence per prompt).
"""

from __future__ import annotations

import threading
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorakitError, UnsupportedError

BASE = "__base__"
# A plan keeps each layer's gathered per-row factors for the next forward (generate's decoding steps)
# when they take at most this many bytes per layer; larger batches gather on every forward instead.
GATHER_CACHE_BYTES = 4 << 20


class Stack(NamedTuple):
    """A layer's plain adapters side by side."""

    names: tuple  # slot k holds adapter names[k]; slot len(names) is all zeros
    packed: torch.Tensor  # (N+1, in·r + r·out): per slot A (in, r) then s·B (r, out), flattened
    split: int  # in·r, where B starts in a packed row (0 for embeddings: A is the table)
    r: int  # r_max; smaller ranks are zero-padded
    table: torch.Tensor | None  # embeddings: ((N+1)·num_embeddings, r), row k·num + id = A_k[:, id]


def _version(layer: nn.Module, name: str) -> tuple | None:
    """What a stack built from adapter `name` is valid for; None when A or B may be trained."""
    A, B = layer.lora_A[name], layer.lora_B[name]
    if A.requires_grad or B.requires_grad:
        return None
    return A.data_ptr(), A._version, B.data_ptr(), B._version, layer.scaling[name]


class Stacks:
    """Per layer, the stack of its plain adapters, reused while valid (see the module doc)."""

    def __init__(self):
        self._entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> (stack, gen, versions)
        self._lock = threading.Lock()

    def get(self, layer: nn.Module, used: list[str]) -> tuple[Stack, bool]:
        """(the layer's stack, whether it is kept here for later calls). Only the adapters this batch uses
        are checked (a stale unused slot is never read, and is caught when a later batch uses it), so a
        check costs O(adapters in the batch). A stack holding a trainable adapter is not kept: the caller
        may keep it for its own call (RowPlan does), when the weights cannot change."""
        hit = self._entries.get(layer)
        if hit is not None and hit[1] == layer.generation:
            versions = hit[2]
            if all(versions.get(n) is not None and versions[n] == _version(layer, n) for n in used):
                return hit[0], True
        stack, versions = _build(layer)
        if any(v is None for v in versions.values()):
            return stack, False
        with self._lock:
            self._entries[layer] = (stack, layer.generation, versions)
        return stack, True


def _build(layer: nn.Module) -> tuple[Stack, dict]:
    names = tuple(n for n in layer.lora_A if n not in layer.variants)  # plain adapters only
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
    return stack, {n: _version(layer, n) for n in names}


class RowPlan:
    """Which adapter each batch row uses; per layer, the rows' slots (and factors) cached on first use."""

    def __init__(self, names: list[str], stacks: Stacks | None = None):
        self.names = list(names)
        self.n = len(self.names)
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            groups.setdefault(name, []).append(i)
        self.groups = {name: torch.tensor(ix) for name, ix in groups.items() if name != BASE}
        self.stacks = stacks if stacks is not None else Stacks()
        self._layers: dict[int, tuple] = {}  # id(layer) -> (stack, device, index (B,), gathered or None)
        self._own: dict[int, tuple] = {}  # id(layer) -> (stack, generation): stacks the store does not keep

    def apply(self, layer: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result (B, ..., out) plus, for each row, the low-rank output of that row's adapter."""
        if x.shape[0] != self.n:
            raise LorakitError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                               f"{self.n} and {x.shape[0]} respectively: give "
                               "one adapter name per row (generate with num_beams or num_return_sequences > 1 "
                               "grows the batch: repeat each name that many times)")
        present = [name for name in self.groups if name in layer.r]  # layer.r: a plain dict, a fast lookup
        if not present:
            return result
        if can_stack(layer, present):
            return _stacked_forward(layer, x, result, self, present)
        return _segment_forward(layer, x, result, self, present)

    def stack(self, layer: nn.Module, used: list[str]) -> Stack:
        """The layer's stack for this plan's forwards. Inside one plan (one adapter_rows block: a forward, or
        the decoding steps of one generate) the weights are taken as fixed, so a stack of trainable adapters,
        which the shared store rebuilds on every call, is built once per plan."""
        own = self._own.get(id(layer))
        if own is not None and own[1] == layer.generation:
            return own[0]
        stack, kept = self.stacks.get(layer, used)
        if not kept:
            self._own[id(layer)] = (stack, layer.generation)
        return stack

    def gather(self, layer: nn.Module, stack: Stack, device: torch.device):
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


def can_stack(layer: nn.Module, present: list[str]) -> bool:
    """The stacked path holds no autograd graph and applies no dropout; it needs neither here."""
    if layer.kind == "conv" or any(name in layer.lora_bias for name in present):  # the segment path has both
        return False
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
    other = [name for name in names if name in layer.variants]
    if other:
        raise LorakitError(f"adapter {other[0]!r} is {layer.variants[other[0]].name}; mixed-adapter batches "
                           "support plain LoRA adapters only")


# -- stacked: gather each row's factors, two batched matmuls ---------------------------------------------

def _stacked_forward(layer: nn.Module, x: torch.Tensor, result: torch.Tensor, plan: RowPlan,
                     present: list[str]) -> torch.Tensor:
    _check_plain(layer, present)
    stack = plan.stack(layer, present)
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
        bias = layer.lora_bias.get(name)  # (out,) or None: PEFT's lora_B.bias
        if layer.kind == "embedding":
            delta = (layer.embed(sub_x, A.T) @ B.T) * s  # (b, T, out)
        elif layer.kind == "conv":  # A: the base's kernel, stride, padding; B: 1x1 with its groups (layer.py)
            base, conv = layer.base_layer, layer.base_kind.conv_fn
            after_A = conv(layer.lora_dropout[name](sub_x.to(A.dtype)), A, None, base.stride, base.padding)
            delta = conv(after_A, B, bias, 1, 0, 1, base.groups) * s  # (b, out, *spatial)
        else:
            delta = F.linear(F.linear(layer.lora_dropout[name](sub_x.to(A.dtype)), A), B, bias) * s  # (b, T, out)
        result.index_add_(0, index, delta.to(result.dtype))
    return result.to(out_dtype)


# -- whole modules: a modules_to_save copy per row ---------------------------------------------------

ROUTABLE_MODULES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # PEFT's list: row-wise modules


def module_rows_forward(plan: RowPlan, original: nn.Module, copies: nn.ModuleDict, x: torch.Tensor,
                        *args, **kwargs) -> torch.Tensor:
    """Run each batch row through its adapter's copy of a module (modules_to_save), `original` for base
    rows and for adapters that keep no copy. Only modules whose rows are independent can be split so
    (PEFT's list); for the others (a GRU mixes rows through its state layout) a TypeError, as in PEFT."""
    if not isinstance(original, ROUTABLE_MODULES):
        names = ", ".join(m.__name__ for m in ROUTABLE_MODULES)
        raise UnsupportedError(f"Mixed batching is only supported for the following modules: {names}. "
                               f"This batch passes a modules_to_save copy of {type(original).__name__}; run one "
                               "adapter per batch (set_adapter) or leave that module out of modules_to_save")
    if x.shape[0] != plan.n:
        raise LorakitError(f"Length of `adapter_names` should be the same as the number of inputs, but got "
                           f"{plan.n} and {x.shape[0]} respectively; give one adapter name per row")
    out = None
    for name in dict.fromkeys(plan.names):  # each adapter once, in order of first use
        index = torch.tensor([i for i, n in enumerate(plan.names) if n == name], device=x.device)
        module = copies[name] if name in copies else original
        sub = module(x.index_select(0, index), *args, **kwargs)  # (b, ...)
        if out is None:
            out = sub.new_empty((x.shape[0], *sub.shape[1:]))
        out.index_copy_(0, index, sub)
    return out
