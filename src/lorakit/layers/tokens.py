"""Per-token adapters in one flat forward: a TokenPlan for continuous-batching steps.

A serving step is one row (1, N) holding tokens of many requests end to end (prefill and decode
together). The caller orders the requests so that each adapter's tokens are one contiguous slice,
and the plan maps adapter -> (lo, hi) over the N tokens. Layers whose input has K rows instead of N
(the output head under logits_to_keep, which sees only the tokens that emit) use a second map over
those K rows. Per LoRA layer: one small GEMM pair per adapter present, accumulated into the base
output slice in place, the same formula as LoraLayer._apply_adapter (so a request alone in a step
gets exactly the numbers a plain forward with that adapter gives). No gather of stacked factors:
a stack per token would materialise N·(in·r + r·out) floats per layer.

With a Pools store (pool.py), slices shorter than `long` tokens (decoding: one token per sequence,
so a step over many adapters is many tiny slices), when a rank has at least `gather_min` of them
in a layer (fewer run faster as GEMMs: benchmarks/bench_tokens.py), are instead gathered per rank: each token's
factors are taken from its rank's slot pool (one index_select) and two batched matmuls add all of
that rank's tokens at once, so the number of small ops per layer grows with the ranks present,
not with the adapters present. Long slices (prefill) keep the per-adapter GEMMs. The gathered
sum differs from the per-slice GEMMs by float rounding only (scaling folded into B first).

A RowPlan (mixed.py) routes batch rows; this routes tokens. Both are handed to the layer through
layer.using_row_plan and applied as plan.apply(layer, x, result).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorakitError
from .mixed import BASE


def slices_of(names: list[str]) -> dict[str, tuple[int, int]]:
    """adapter -> (lo, hi) for a list of names in which each adapter's entries are contiguous; the base
    gets no slice (nothing to add)."""
    out: dict[str, tuple[int, int]] = {}
    lo = 0
    for i in range(1, len(names) + 1):
        if i == len(names) or names[i] != names[lo]:
            if names[lo] != BASE:
                if names[lo] in out:
                    raise LorakitError(f"the tokens of adapter {names[lo]!r} are not contiguous; order the "
                                       "step's requests by adapter")
                out[names[lo]] = (lo, i)
            lo = i
    return out


class TokenPlan:
    """Token i of a flat (1, N) forward runs adapter names[i]; row j of the K emitting rows runs
    emit_names[j] (layers that see K rows: the output head under logits_to_keep)."""

    def __init__(self, names: list[str], emit_names: list[str], pools=None, long: int = 16, gather_min: int = 8):
        self.n, self.n_emit = len(names), len(emit_names)
        self.tokens = slices_of(list(names))
        self.emits = slices_of(list(emit_names))
        self.pools, self.long, self.gather_min = pools, long, gather_min
        self._which: dict = {}  # (slots, token ranges, device) -> the gather index (this plan's step only)

    def apply(self, layer: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result (1, n, out) plus each slice's adapter output, in place."""
        embedding = layer.kind == "embedding"
        x2 = x.reshape(-1) if embedding else x.reshape(-1, x.shape[-1])  # (n,) ids or (n, in)
        n = x2.shape[0]
        slices = self.tokens if n == self.n else self.emits if n == self.n_emit else None
        if slices is None:
            raise LorakitError(f"a TokenPlan for {self.n} tokens ({self.n_emit} emitting) reached a layer "
                               f"with {n}; the plan is for flat (1, N) serving steps only")
        if not result.is_contiguous():
            result = result.contiguous()
        out2 = result.view(-1, result.shape[-1])  # (n, out): a view, written in place
        short: dict[int, list[tuple[str, int, int]]] = {}  # rank -> the short slices gathered together
        for name, (lo, hi) in slices.items():
            if name not in layer.r:
                continue
            if name in layer.variants:
                raise LorakitError(f"adapter {name!r} is {layer.variants[name].name}; per-token batches "
                                   "support plain LoRA adapters only")
            if self.pools is not None and not embedding and hi - lo < self.long:
                short.setdefault(0 if self.pools.padded else layer.r[name], []).append((name, lo, hi))
                continue
            self._segment(layer, x2, out2, name, lo, hi, embedding)
        for group in short.values():
            if len(group) >= self.gather_min:
                self._gathered(layer, x2, out2, max(layer.r[name] for name, _, _ in group), group)
            else:
                for name, lo, hi in group:
                    self._segment(layer, x2, out2, name, lo, hi, embedding)
        return result

    def _segment(self, layer: nn.Module, x2: torch.Tensor, out2: torch.Tensor, name: str, lo: int, hi: int,
                 embedding: bool) -> None:
        """out2[lo:hi] += adapter `name`'s output for tokens lo..hi: one GEMM pair, as _apply_adapter."""
        A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        if embedding:  # as _apply_adapter: result + (embed(ids, Aᵀ) @ Bᵀ)·s
            out2[lo:hi] += (layer.embed(x2[lo:hi], A.T) @ B.T) * s
            return
        after_A = F.linear(x2[lo:hi].to(A.dtype), A)  # (t, r)
        if out2.dtype == after_A.dtype == B.dtype:
            out2[lo:hi].addmm_(after_A, B.T, alpha=s)  # the GEMM _apply_adapter runs
        else:  # fp32 adapters on a bf16 base
            out2[lo:hi] += (F.linear(after_A, B) * s).to(out2.dtype)

    def _gathered(self, layer: nn.Module, x2: torch.Tensor, out2: torch.Tensor, r: int, group: list) -> None:
        """out2[tokens of group] += each token's x·Aᵀ·(s·B)ᵀ, factors gathered from the rank-r pool."""
        pool = self.pools.pool(layer, r)
        slots = tuple(pool.slot(layer, name) for name, _, _ in group)
        key = (slots, tuple((lo, hi) for _, lo, hi in group), x2.device)
        which = self._which.get(key)  # layers mostly share their slot numbers: one index tensor a step
        if which is None:
            which = self._which[key] = torch.tensor([k for k, (_, lo, hi) in zip(slots, group) for _ in range(lo, hi)],
                                                    device=x2.device)
        rows = pool.packed.index_select(0, which)  # (T, in·r + r·out)
        A_sel = rows[:, :pool.split].view(-1, pool.n_in, pool.r)  # (T, in, r)
        B_sel = rows[:, pool.split:].view(-1, pool.r, pool.n_out)  # (T, r, out)
        lo, hi = group[0][1], group[-1][2]
        if hi - lo == len(which):  # contiguous (the engine orders a step by rank, then adapter)
            xs = x2[lo:hi].to(A_sel.dtype).unsqueeze(1)  # (T, 1, in)
            out2[lo:hi] += torch.bmm(torch.bmm(xs, A_sel), B_sel).squeeze(1).to(out2.dtype)
        else:
            tokens = torch.tensor([t for _, lo, hi in group for t in range(lo, hi)], device=x2.device)
            xs = x2.index_select(0, tokens).to(A_sel.dtype).unsqueeze(1)
            out2.index_add_(0, tokens, torch.bmm(torch.bmm(xs, A_sel), B_sel).squeeze(1).to(out2.dtype))
