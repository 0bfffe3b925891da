"""Slot pools: per layer and rank, the adapters' factors packed in preallocated slots (S-LoRA's pool).

A serving step gathers, per token, its adapter's factors and runs two batched matmuls; the factors
come from a pool instead of being stacked afresh: slot k of a layer's rank-r pool holds adapter k's
Aᵀ in A[k] (in, r) and (s·B)ᵀ in B[k] (r, out) of two preallocated tensors A (cap, in, r) and
B (cap, r, out), so a step's gather is one index_select on each, straight into bmm's layout. Adapters
enter a slot the first time a step uses them and leave when they are deleted from the layer, so
attaching or evicting one adapter copies one adapter, never the whole set (a stack keyed on the
layer's generation would be rebuilt on every attach: with a thousand adapters over 64 resident
slots, attaches are frequent).

A slot is valid while the layer still holds the very same A and B parameters (identity, not name:
a name may come back with other weights) with unchanged version counters and scaling. Pools are
per rank, so a rank-8 adapter costs rank-8 work next to rank-16 ones; `padded=True` instead keeps
one pool per layer at the largest rank seen (smaller ranks zero-padded), the alternative measured
in benchmarks/bench_tokens.py. The owner (a serving engine) keeps one Pools; it is not global.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

PADDED = -1  # the key of the one padded pool of a layer


class Pool:
    """One layer's slots at one rank."""

    def __init__(self, layer: nn.Module, r: int, like: torch.Tensor):
        self.r, self.n_in, self.n_out = r, layer.in_features, layer.out_features
        with torch.inference_mode(False), torch.no_grad():  # both grow by doubling
            self.A = like.new_zeros(4, self.n_in, r)  # slot k: Aᵀ (in, r), zero-padded past the adapter's rank
            self.B = like.new_zeros(4, r, self.n_out)  # slot k: (s·B)ᵀ (r, out)
        self.slots: dict[str, tuple] = {}  # name -> (slot, A, A._version, B, B._version, scaling)
        self.free: list[int] = list(range(3, -1, -1))
        self.generation = layer.generation

    def slot(self, layer: nn.Module, name: str) -> int:
        """The slot of adapter `name`, (re)written when new or changed. The caller has swept the pool for
        the layer's generation, so a kept entry holds the layer's own A and B; their version counters
        and the scaling tell an in-place change (checked without ParameterDict's slow lookups)."""
        hit = self.slots.get(name)
        if hit is not None and hit[2] == hit[1]._version and hit[4] == hit[3]._version \
                and hit[5] == layer.scaling[name]:
            return hit[0]
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        k = hit[0] if hit is not None else self._take()
        r = layer.r[name]
        with torch.inference_mode(False), torch.no_grad():
            self.A[k].zero_(), self.B[k].zero_()
            self.A[k][:, :r] = A.T  # (in, r)
            self.B[k][:r] = (B * s).T  # (r, out)
        self.slots[name] = (k, A, A._version, B, B._version, s)
        return k

    def sweep(self, layer: nn.Module) -> None:
        """Free the slots of adapters the layer no longer holds (after attaches and deletes)."""
        if layer.generation == self.generation:
            return
        for name, hit in list(self.slots.items()):
            if name not in layer.lora_A or layer.lora_A[name] is not hit[1] or layer.lora_B[name] is not hit[3]:
                del self.slots[name]
                self.free.append(hit[0])
        self.generation = layer.generation

    def _take(self) -> int:
        if not self.free:
            cap = self.A.shape[0]
            with torch.inference_mode(False), torch.no_grad():
                A, B = self.A.new_zeros(2 * cap, *self.A.shape[1:]), self.B.new_zeros(2 * cap, *self.B.shape[1:])
                A[:cap], B[:cap] = self.A, self.B
            self.A, self.B = A, B
            self.free = list(range(2 * cap - 1, cap - 1, -1))
        return self.free.pop()


class Pools:
    """Per layer (weakly held) and rank, a Pool; `padded` keeps one pool per layer at the largest rank."""

    def __init__(self, padded: bool = False):
        self.padded = padded
        self._pools: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> {rank or PADDED: Pool}

    def pool(self, layer: nn.Module, r: int) -> Pool:
        per_layer = self._pools.get(layer)
        if per_layer is None:
            per_layer = self._pools.setdefault(layer, {})
        key = PADDED if self.padded else r
        pool = per_layer.get(key)
        if pool is not None and pool.r < r:  # padded: a larger rank arrived; rebuild at that rank
            pool = None
        if pool is None:
            rank = max([r, *layer.r.values()]) if self.padded else r
            pool = per_layer[key] = Pool(layer, rank, layer.lora_A[next(iter(layer.lora_A))])
        pool.sweep(layer)
        return pool
