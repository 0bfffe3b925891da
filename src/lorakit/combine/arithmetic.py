"""Adapter arithmetic: pure functions over LoRA factors and dense weight deltas.

A LoRA adapter on one module is `Factors(A, B, scaling)` with A (r, in), B (out, r) and
dense update ΔW = scaling · B @ A, shape (out, in). Adapters may differ in r and scaling
(alpha/r, or alpha/sqrt(r) with rsLoRA); the caller computes the scaling. Nothing here
knows about models or nn.Module: callers loop over modules and write the result back.

What lives here (Factors, delta and negate come from factors.py, the checks from checks.py):
  delta(f)                 the dense ΔW of one adapter
  negate(f)                exact negation (B flipped)
  combine(factors, ...)    weighted combination of adapters on one module -> (Factors, info)
  combine_dense(deltas,..) the same over dense deltas (used by combine and the DoRA path)
  truncate(f, rank, ...)   re-rank one adapter by SVD (compression)
  dora_effective_delta     the weight change a DoRA adapter really makes
  combine_dora(...)        combine DoRA adapters into one plain LoRA adapter

Methods of combine (all but `cat` end in a truncated SVD to `rank`):
  cat          exact: ranks concatenated, rank = Σ r_i.
  linear       Σ w_i ΔW_i, refactorised by SVD. `svd` is an alias (PEFT's combination_type="svd").
  ties         TIES-merging (Yadav et al. 2023) of the dense ΔW_i: trim each to its top `density`
               fraction by magnitude, elect a sign per entry, take the weighted *mean* of the
               entries that agree with it. Follows peft.utils.merge_utils exactly.
  dare_linear  DARE (Yu et al. 2023): drop entries of each ΔW_i with probability 1 - density,
               rescale by 1/density, then linear. `dare` is an alias.
  dare_ties    DARE's drop-and-rescale, then TIES's sign election and disjoint mean.
  magnitude_prune  trim as in ties, then the weighted sum (no sign election).
PEFT's names `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` are accepted
as aliases: they are the same dense-then-SVD operations. PEFT's plain `linear`/`ties`/`dare_*`
work on A and B separately (and need equal ranks); lorakit's always work on the dense ΔW_i,
so the result approximates the stated formula, with cross terms included, for any ranks.

The returned factors satisfy target_scaling · B @ A ≈ target, where target_scaling is the
scaling the new adapter will have (from its own r and alpha). SVD results split the singular
values evenly: B = sign(t) · U · sqrt(S/|t|), A = sqrt(S/|t|) · Vh, so ‖B[:, k]‖ = ‖A[k]‖.
"""

import math

import torch

from lorakit.errors import LorakitError

from .checks import canonical, delta_problems, describe, factor_problems, generator_problems, option_problems
from .factors import Factors, delta, negate

__all__ = ["Factors", "delta", "negate", "canonical", "option_problems", "combine", "combine_dense", "truncate",
           "dora_effective_delta", "combine_dora"]

# Dense SVDs at most this many entries run in float64 (1024 x 1024 takes well under a second).
_FLOAT64_SVD_MAX_NUMEL = 1 << 20


# ---------------------------------------------------------------- dense merges


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic runs in at least float32, whatever the storage dtype (bf16, fp16)."""
    return torch.promote_types(dtype, torch.float32)


def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top int(density · numel) entries by |t| (peft's magnitude_based_pruning)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: torch.Tensor, density: float, generator) -> torch.Tensor:
    """Keep each entry with probability density and rescale by 1/density (DARE; peft's random_pruning)."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def _disjoint_mean(stacked: torch.Tensor, w: torch.Tensor, majority_sign: str) -> torch.Tensor:
    """TIES's elect + disjoint merge over stacked (n, out, in) trimmed deltas, weights w (n, 1, 1).

    As in peft and the paper, the sign is elected on the unweighted deltas ("total": sign of
    their sum; "frequency": the more common sign, ties going to +), and the result is the
    mean of the weighted entries that agree with it (zeros never agree, so trimmed entries
    do not count).
    """
    sign = stacked.sign()  # (n, out, in)
    votes = stacked.sum(dim=0) if majority_sign == "total" else sign.sum(dim=0)  # (out, in)
    agree = sign == torch.where(votes >= 0, 1, -1).to(sign.dtype)  # (n, out, in)
    summed = (stacked * w * agree).sum(dim=0)  # (out, in)
    return summed / agree.sum(dim=0).clamp(min=1)


def _merge_dense(deltas, weights, canon, density, majority_sign, generator) -> torch.Tensor:
    """The exact (untruncated) target of one method over dense deltas, in the work dtype."""
    work = _work_dtype(deltas[0].dtype)
    ds = [d.to(work) for d in deltas]  # each (out, in)
    w = torch.tensor([float(x) for x in weights], dtype=work, device=ds[0].device).view(-1, 1, 1)
    if canon in ("ties", "magnitude_prune"):
        ds = [_prune_magnitude(d, density) for d in ds]
    elif canon in ("dare_linear", "dare_ties"):
        ds = [_prune_random(d, density, generator) for d in ds]
    stacked = torch.stack(ds)  # (n, out, in)
    if canon in ("ties", "dare_ties"):
        return _disjoint_mean(stacked, w, majority_sign)
    return (stacked * w).sum(dim=0)  # linear, dare_linear, magnitude_prune


# ---------------------------------------------------------------- SVD -> factors


def _svd_dtype(work: torch.dtype, device: torch.device, numel: int) -> torch.dtype:
    """float64 for small problems (more exact), the work dtype for big ones; MPS has no float64."""
    if device.type == "mps" or numel > _FLOAT64_SVD_MAX_NUMEL:
        return work
    return torch.float64


def _svd_of_product(B: torch.Tensor, A: torch.Tensor):
    """Thin SVD of B @ A for B (out, R), A (R, in) without forming the dense (out, in) matrix.

    B = Qb Rb and Aᵀ = Qa Ra (reduced QR), so B @ A = Qb (Rb Raᵀ) Qaᵀ and only the small
    core Rb Raᵀ needs an SVD: O((out + in) R²) instead of O(out · in · min(out, in)).
    """
    dtype = torch.float64 if A.device.type != "mps" else _work_dtype(A.dtype)
    Qb, Rb = torch.linalg.qr(B.to(dtype))  # (out, p), (p, R), p = min(out, R)
    Qa, Ra = torch.linalg.qr(A.to(dtype).T)  # (in, q), (q, R), q = min(in, R)
    Uc, S, Vhc = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core (p, q)
    return Qb @ Uc, S, Vhc @ Qa.T  # U (out, k), S (k,), Vh (k, in)


def _svd_dense(M: torch.Tensor):
    """Thin SVD of a dense (out, in) matrix, in float64 when it is small."""
    dtype = _svd_dtype(M.dtype, M.device, M.numel())
    return torch.linalg.svd(M.to(dtype), full_matrices=False)


def _to_factors(U, S, Vh, rank, target_scaling, out_dtype, canon):
    """Keep the top `rank` singular triplets; split them evenly between B and A.

    target_scaling · B @ A = U_k S_k Vh_k. If rank exceeds the number of singular values
    (min(out, in)), A and B are padded with zero rows / columns so r is exactly `rank`.
    """
    k = min(rank, S.shape[0])
    total = S.square().sum()
    dropped = S[k:].square().sum()
    rel = (dropped / total).sqrt().item() if total > 0 else 0.0
    root = (S[:k] / abs(target_scaling)).sqrt()  # (k,)
    B = U[:, :k] * root * math.copysign(1.0, target_scaling)  # (out, k)
    A = root[:, None] * Vh[:k]  # (k, in)
    if rank > k:
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)  # (out, rank)
        A = torch.cat([A, A.new_zeros(rank - k, A.shape[1])], dim=0)  # (rank, in)
    info = {"method": canon, "rank": rank, "relative_error": rel, "singular_values": S.detach().cpu()}
    return Factors(A.to(out_dtype), B.to(out_dtype), float(target_scaling)), info


# ---------------------------------------------------------------- public combinations


def combine(
    factors: list[Factors],
    weights: list[float],
    method: str,
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    generator: torch.Generator | None = None,
    target_scaling: float = 1.0,
) -> tuple[Factors, dict]:
    """Combine adapters on one module into one adapter approximating Σ_i w_i ΔW_i (per `method`).

    Returns (Factors(A, B, target_scaling), info) with target_scaling · B @ A ≈ the method's
    target, in the dtype of factors[0]. info: "method" (canonical name), "rank", and
    "relative_error" = ‖target - result‖_F / ‖target‖_F of the SVD truncation only (0 for cat;
    for ties/dare the target is the trimmed/dropped merge, not Σ w_i ΔW_i), plus
    "singular_values" of the target (not for cat). Default rank: Σ r_i, at most min(out, in);
    an explicit rank above min(out, in) is padded with zeros. dare uses `generator`
    (or torch's global RNG if None). See the module docstring for the methods.
    """
    canon = canonical(method)
    problems = factor_problems(factors)
    n = len(factors) if isinstance(factors, (list, tuple)) else 0
    problems += option_problems(method, n, weights, rank, density, majority_sign, target_scaling, generator)
    if not problems:
        problems += generator_problems(generator, factors[0].A.device, canon)
        total_rank = sum(f.A.shape[0] for f in factors)
        if canon == "cat" and rank is not None and rank != total_rank:
            problems.append(
                f"rank = {rank} with method 'cat', which is exact with rank Σ r_i = {total_rank}: "
                "drop rank, or use method='linear' to re-rank by SVD"
            )
    LorakitError.collect(problems, f"combine(method={method!r}): {len(problems)} problem(s):")

    out_dtype = factors[0].A.dtype
    if canon in ("cat", "linear"):
        B, A = _stack(factors, weights, target_scaling if canon == "cat" else 1.0)
        if canon == "cat":
            info = {"method": canon, "rank": A.shape[0], "relative_error": 0.0}
            return Factors(A.to(out_dtype), B.to(out_dtype), float(target_scaling)), info
        out, inp = B.shape[0], A.shape[1]
        rank = rank if rank is not None else min(total_rank, out, inp)
        return _to_factors(*_svd_of_product(B, A), rank, target_scaling, out_dtype, canon)
    deltas = [f.scaling * (f.B.to(_work_dtype(f.B.dtype)) @ f.A.to(_work_dtype(f.A.dtype))) for f in factors]
    rank = rank if rank is not None else min(total_rank, *deltas[0].shape)
    target = _merge_dense(deltas, weights, canon, density, majority_sign, generator)
    return _to_factors(*_svd_dense(target), rank, target_scaling, out_dtype, canon)


def _stack(factors, weights, target_scaling):
    """B = [w_i s_i / t · B_i] (out, Σr) and A = [A_i] (Σr, in), so t · B @ A = Σ w_i ΔW_i exactly."""
    work = _work_dtype(factors[0].A.dtype)
    A = torch.cat([f.A.to(work) for f in factors], dim=0)  # (Σr, in)
    B = torch.cat(
        [f.B.to(work) * (float(w) * f.scaling / target_scaling) for f, w in zip(factors, weights)], dim=1
    )  # (out, Σr)
    return B, A


def combine_dense(
    deltas: list[torch.Tensor],
    weights: list[float],
    method: str,
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    generator: torch.Generator | None = None,
    target_scaling: float = 1.0,
) -> tuple[Factors, dict]:
    """Combine dense (out, in) weight deltas into one LoRA adapter by the method's merge, then SVD.

    Same methods (except 'cat', which needs factors), options and info as `combine`; the
    default rank is min(out, in), which is exact. Output dtype: that of deltas[0]. Use it for
    deltas that are not a plain B @ A, such as DoRA's effective deltas (see combine_dora),
    possibly mixed with delta(f) of plain adapters.
    """
    canon = canonical(method)
    problems = delta_problems(deltas)
    n = len(deltas) if isinstance(deltas, (list, tuple)) else 0
    problems += option_problems(method, n, weights, rank, density, majority_sign, target_scaling, generator)
    if canon == "cat":
        problems.append("method 'cat' needs the factors: use combine(factors, ...) or another method")
    if not problems:
        problems += generator_problems(generator, deltas[0].device, canon)
    LorakitError.collect(problems, f"combine_dense(method={method!r}): {len(problems)} problem(s):")

    rank = rank if rank is not None else min(deltas[0].shape)
    target = _merge_dense(deltas, weights, canon, density, majority_sign, generator)
    return _to_factors(*_svd_dense(target), rank, target_scaling, deltas[0].dtype, canon)


def truncate(f: Factors, rank: int, target_scaling: float) -> tuple[Factors, dict]:
    """Re-rank one adapter by SVD: the best rank-`rank` approximation of ΔW (Eckart–Young).

    target_scaling is the scaling the re-ranked adapter will have (e.g. alpha/rank).
    Returns (Factors, info) as combine does; info["relative_error"] is what was cut.
    """
    return combine([f], [1.0], "linear", rank=rank, target_scaling=target_scaling)


# ---------------------------------------------------------------- DoRA


def dora_effective_delta(W0: torch.Tensor, f: Factors, magnitude: torch.Tensor) -> torch.Tensor:
    """The weight change a DoRA adapter makes: m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_row − W0, shape (out, in).

    W0 (out, in) is the base weight, magnitude m (out,) DoRA's magnitude vector, ΔW = delta(f).
    The norm is per output row (torch.linalg.norm(W, dim=1), as PEFT). Returned in float32
    (float64 if the inputs are): it is a small difference of two large numbers, and rounding
    it to bf16 before combining would throw most of it away.
    """
    problems = factor_problems([f])
    if not (isinstance(W0, torch.Tensor) and W0.dim() == 2 and W0.is_floating_point()):
        problems.append(f"W0 must be the 2-D float base weight (out, in), got {describe(W0)}")
    elif not problems and tuple(W0.shape) != (f.B.shape[0], f.A.shape[1]):
        problems.append(
            f"W0 is {tuple(W0.shape)} but the adapter updates an (out, in) = "
            f"{(f.B.shape[0], f.A.shape[1])} weight: pass the base weight of the adapter's module"
        )
    if not (isinstance(magnitude, torch.Tensor) and magnitude.dim() == 1 and magnitude.is_floating_point()):
        problems.append(f"magnitude must be a 1-D float tensor (out,), got {describe(magnitude)}")
    elif isinstance(W0, torch.Tensor) and W0.dim() == 2 and magnitude.shape[0] != W0.shape[0]:
        problems.append(
            f"magnitude has {magnitude.shape[0]} entries but W0 has {W0.shape[0]} output rows: "
            "pass the lora_magnitude_vector of this module"
        )
    LorakitError.collect(problems, f"dora_effective_delta: {len(problems)} problem(s):")

    work = _work_dtype(W0.dtype)
    W0w = W0.to(work)
    W = W0w + f.scaling * (f.B.to(work) @ f.A.to(work))  # (out, in)
    norm = torch.linalg.norm(W, dim=1)  # (out,)
    return (magnitude.to(work) / norm)[:, None] * W - W0w  # (out, in)


def combine_dora(
    W0: torch.Tensor,
    factors: list[Factors],
    magnitudes: list[torch.Tensor],
    weights: list[float],
    method: str,
    rank: int | None = None,
    **options,
) -> tuple[Factors, dict]:
    """Combine DoRA adapters on one module into one *plain* LoRA adapter.

    Defined as combine_dense over the effective deltas dora_effective_delta(W0, f_i, m_i):
    DoRA's magnitude rescaling is not additive, so there is no exact DoRA-valued sum. The
    effective deltas are full rank in general, so info["relative_error"] is rarely 0. Default
    rank: Σ r_i, at most min(out, in). options: density, majority_sign, generator, target_scaling.
    Result dtype: that of factors[0].
    """
    if not isinstance(magnitudes, (list, tuple)) or len(magnitudes) != len(factors):
        LorakitError.collect([
            f"got {len(magnitudes) if isinstance(magnitudes, (list, tuple)) else magnitudes!r} magnitudes for "
            f"{len(factors)} adapters: give one magnitude vector per adapter"
        ])
    deltas = [dora_effective_delta(W0, f, m) for f, m in zip(factors, magnitudes)]
    if rank is None and deltas:
        rank = min(sum(f.A.shape[0] for f in factors), *deltas[0].shape)
    result, info = combine_dense(deltas, weights, method, rank=rank, **options)
    return result._replace(A=result.A.to(factors[0].A.dtype), B=result.B.to(factors[0].B.dtype)), info
