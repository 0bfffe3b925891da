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
in a layer (fewer run faster as GEMMs: one GEMM pair costs about a quarter of a gather on CPU, so
the default is 4, measured in docs/benchmarks.md), are instead gathered per rank: each token's
factors are taken from its rank's slot pool (an index_select of A and of B) and two batched matmuls add all of
that rank's tokens at once, so the number of small ops per layer grows with the ranks present,
not with the adapters present. Long slices (prefill) keep the per-adapter GEMMs. The gathered
sum differs from the per-slice GEMMs by float rounding only (scaling folded into B first). With a
`kernel` (bgmv.py: compiled, fp32 on CPU) a contiguous group is one call that reads the factors in
the pools instead of copying them out.

A RowPlan (mixed.py) routes batch rows; this routes tokens. Both are handed to the layer through
layer.using_row_plan and applied as plan.apply(layer, x, result).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorakitError
from . import bgmv
from .mixed import BASE


def slices_of(names: list[str]) -> list[tuple[str, int, int]]:
    """(adapter, lo, hi) in token order for a list of names in which each adapter's entries are
    contiguous; the base gets no slice (nothing to add)."""
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
    return [(name, lo, hi) for name, (lo, hi) in out.items()]


class TokenPlan:
    """Token i of a flat (1, N) forward runs adapter names[i]; row j of the K emitting rows runs
    emit_names[j] (layers that see K rows: the output head under logits_to_keep)."""

    def __init__(self, names: list[str], emit_names: list[str], pools=None, long: int = 16, gather_min: int = 4,
                 kernel=None):
        self.n, self.n_emit = len(names), len(emit_names)
        self.tokens = slices_of(list(names))  # what apply walks for layers that see all N tokens
        self.emits = slices_of(list(emit_names))  # ... and for those that see the K emitting rows
        self.pools, self.long, self.gather_min = pools, long, gather_min
        self.kernel = kernel  # bgmv.load()'s module or None: the gather reads the pools in place
        self._which: dict = {}  # (slots, token ranges, device) -> the gather index (this plan's step only)

    def apply(self, layer: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result (1, n, out) plus each slice's adapter output, in place.

        This runs for every LoRA layer of every serving step, so it is written for few Python ops (each
        costs several microseconds here, as much as a small GEMM): slices precomputed per plan,
        narrow instead of indexing, no casts or slices when they would change nothing, and the
        factors read from the ParameterDicts' own tables (ParameterDict.__getitem__ is a getattr)."""
        if not self.tokens and not self.emits:  # a base-only step: nothing to add
            return result
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
        ranks, variants, pools = layer.r, layer.variants, self.pools
        gather = pools is not None and not embedding
        short: dict[int, list[tuple[str, int, int]]] = {}  # rank -> short slices gathered together
        for name, lo, hi in slices:
            r = ranks.get(name)
            if r is None:
                continue
            if variants and name in variants:
                raise LorakitError(f"adapter {name!r} is {variants[name].name}; per-token batches "
                                   "support plain LoRA adapters only")
            if gather and hi - lo < self.long:
                short.setdefault(0 if pools.padded else r, []).append((name, lo, hi))
                continue
            self._segment(layer, x2, out2, name, lo, hi, embedding)
        for group in short.values():
            if len(group) >= self.gather_min:
                self._gathered(layer, x2, out2, max(ranks[name] for name, _, _ in group), group)
            else:
                for name, lo, hi in group:
                    self._segment(layer, x2, out2, name, lo, hi, embedding)
        return result

    @staticmethod
    def _segment(layer: nn.Module, x2: torch.Tensor, out2: torch.Tensor, name: str, lo: int, hi: int,
                 embedding: bool) -> None:
        """out2[lo:hi] += adapter `name`'s output for tokens lo..hi: one GEMM pair, as _apply_adapter."""
        A, B = layer.lora_A._parameters[name], layer.lora_B._parameters[name]
        s = layer.scaling[name]
        whole = hi - lo == x2.shape[0]
        xs = x2 if whole else x2.narrow(0, lo, hi - lo)
        os_ = out2 if whole else out2.narrow(0, lo, hi - lo)
        if embedding:  # as _apply_adapter: result + (embed(ids, Aᵀ) @ Bᵀ)·s
            os_.add_((layer.embed(xs, A.T) @ B.T) * s)
            return
        after_A = F.linear(xs if xs.dtype == A.dtype else xs.to(A.dtype), A)  # (t, r)
        if out2.dtype == after_A.dtype == B.dtype:
            os_.addmm_(after_A, B.T, alpha=s)  # the GEMM _apply_adapter runs
        else:  # fp32 adapters on a bf16 base
            os_.add_((F.linear(after_A, B) * s).to(out2.dtype))

    def _gathered(self, layer: nn.Module, x2: torch.Tensor, out2: torch.Tensor, r: int, group: list) -> None:
        """out2[tokens of group] += each token's x·Aᵀ·(s·B)ᵀ, factors gathered from the rank-r pool."""
        pool = self.pools.pool(layer, r)
        slot = pool.slot
        slots = tuple([slot(layer, name) for name, _, _ in group])
        lo, hi = group[0][1], group[-1][2]
        key = (slots, tuple([a for _, a, _ in group]), x2.device)  # the slices' starts fix their ranges
        which = self._which.get(key)  # layers mostly share their slot numbers: one index tensor a step
        if which is None:
            which = self._which[key] = torch.tensor([k for k, (_, a, b) in zip(slots, group) for _ in range(a, b)],
                                                    device=x2.device)
        T = which.shape[0]
        if hi - lo == T and self.kernel is not None and bgmv.usable(out2, x2, pool.A):
            self.kernel.bgmv_(out2, x2, pool.A, pool.B, which, lo)  # the same sums, no gathered copies
            return
        A_sel, B_sel = pool.A.index_select(0, which), pool.B.index_select(0, which)  # (T, in, r), (T, r, out)
        if hi - lo == T:  # contiguous (the engine orders a step by rank, then adapter)
            xs = x2.view(T, 1, -1) if T == x2.shape[0] else x2.narrow(0, lo, T).unsqueeze(1)  # (T, 1, in)
            if xs.dtype != A_sel.dtype:
                xs = xs.to(A_sel.dtype)
            if out2.dtype == B_sel.dtype:  # accumulate into the output rows: (T, 1, out) += (T, 1, r)·(T, r, out)
                (out2.view(T, 1, -1) if T == out2.shape[0] else out2.narrow(0, lo, T).unsqueeze(1)).baddbmm_(
                    torch.bmm(xs, A_sel), B_sel)
            else:  # fp32 adapters on a bf16 base
                out2.narrow(0, lo, T).add_(torch.bmm(torch.bmm(xs, A_sel), B_sel).squeeze(1).to(out2.dtype))
        else:
            tokens = torch.tensor([t for _, lo, hi in group for t in range(lo, hi)], device=x2.device)
            xs = x2.index_select(0, tokens).to(A_sel.dtype).unsqueeze(1)
            out2.index_add_(0, tokens, torch.bmm(torch.bmm(xs, A_sel), B_sel).squeeze(1).to(out2.dtype))
