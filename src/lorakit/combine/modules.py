"""Combining adapters module by module: the shared core of combining on a model and on folders.

Per module, the adapters that target it are combined by arithmetic.py: `cat` stacks the factors
(exact, rank Σ r_i); every other method forms its dense target from the ΔW_i and keeps the top
singular triplets (linear/svd, ties, dare_*, magnitude_prune and PEFT's *_svd aliases). A module that
only some adapters target combines those present; the others count as 0.

The new adapter's config. Per module rank: Σ r_i for cat; else `rank`, or by default Σ r_i capped
at min(out, in), which makes `linear` exact (PEFT's default is max r_i). The config's r is the most
common module rank; modules with another rank get a rank_pattern entry (escaped full name). Scaling:
use_rslora is taken from the first adapter and lora_alpha is chosen so that the scaling is exactly
1 at rank r (alpha = r, or sqrt(r) with rsLoRA); every module's factors are written for the scaling
its own (r, alpha) gives, so the new adapter reproduces the target ΔW in lorakit and in PEFT.
(PEFT's add_weighted_adapter sets alpha = r whatever use_rslora is, so with rsLoRA its result is
sqrt(r) times too large: PEFT issue #3761. tests/combine/test_model.py shows the difference.)

DoRA adapters are combined through their effective deltas m·(W0+ΔW)/‖W0+ΔW‖_row − W0, which
depend on the base weight W0 (arithmetic.combine_dora); the result is a plain LoRA adapter (no
magnitude vector) whose ΔW approximates the weighted effective deltas, with the truncation error in
the report. DoRA's magnitude rescaling is not additive, so no DoRA-valued sum exists; `cat` refuses
DoRA adapters. modules_to_save copies are full modules, not low-rank deltas: combining refuses them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import LoraConfig, lora_scaling
from .arithmetic import Factors, canonical, combine, combine_dense, dora_effective_delta, option_problems


@dataclass
class Source:
    """One adapter's part of one module."""

    adapter: int  # its position in the list of adapters being combined
    factors: Factors  # A (r, in), B (out, r), scaling
    magnitude: torch.Tensor | None = None  # DoRA's m (out,), None for plain LoRA
    kind: str = "linear"  # "embedding" for an nn.Embedding (A (r, num), B (dim, r)); files need to know


@dataclass
class CombineReport:
    """What combining did, module by module; str(report) is the summary."""

    method: str
    new_name: str
    adapters: list[str]
    weights: list[float]
    r: int = 0
    modules: dict[str, dict] = field(default_factory=dict)  # name -> rank, relative_error, adapters

    @property
    def max_error(self) -> float:
        return max((m["relative_error"] for m in self.modules.values()), default=0.0)

    @property
    def mean_error(self) -> float:
        return sum(m["relative_error"] for m in self.modules.values()) / max(len(self.modules), 1)

    @property
    def worst_module(self) -> str | None:
        return max(self.modules, key=lambda k: self.modules[k]["relative_error"], default=None)

    def summary(self) -> str:
        exact = sum(m["relative_error"] < 1e-6 for m in self.modules.values())
        parts = ", ".join(f"{w:g}·{a}" for a, w in zip(self.adapters, self.weights))
        text = (f"{self.new_name!r} = {self.method}({parts}), r={self.r}, {len(self.modules)} modules; "
                f"truncation error ‖target − result‖/‖target‖: mean {self.mean_error:.2e}, "
                f"max {self.max_error:.2e}")
        if self.max_error >= 1e-6:
            text += f" ({self.worst_module})"
        return text + f"; {exact} module(s) exact"

    __str__ = summary


# -- the shared core: modules' sources -> the new adapter's config, factors and report --------------------

def check_options(names, weights, method, rank, density, majority_sign, generator) -> list[str]:
    """Problems with the options (not the adapters); arithmetic's checks plus the model-level ones."""
    problems = option_problems(method, len(names), weights, rank, density, majority_sign, 1.0, generator)
    if canonical(method) == "cat" and rank is not None:
        problems.append(f"rank={rank} with method 'cat', which is exact with rank Σ r_i per module: drop the "
                        "rank, or use method='linear' (PEFT: 'svd') to re-rank by SVD")
    return problems


def combine_modules(sources: dict[str, list[Source]], weights: list[float], method: str, rank: int | None,
                    rslora: bool, base_weight: Callable[[str], torch.Tensor] | None = None,
                    **options) -> tuple[dict, dict[str, Factors], list]:
    """Combine every module; returns (config fields r/lora_alpha/rank_pattern/use_rslora, factors, infos).

    base_weight(module) gives W0 (out, in) for modules with DoRA sources. options: density,
    majority_sign, generator (arithmetic.combine's names).
    """
    canon = canonical(method)
    ranks = {mod: _module_rank(srcs, canon, rank) for mod, srcs in sources.items()}
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))  # the most common module rank (ties: the larger)
    alpha = math.sqrt(r) if rslora else r  # scaling exactly 1 at rank r
    fields = {"r": r, "lora_alpha": alpha, "use_rslora": rslora,
              "rank_pattern": {re.escape(mod): rm for mod, rm in ranks.items() if rm != r}}
    factors, infos = {}, []
    for mod, srcs in sources.items():
        target_scaling = lora_scaling(alpha, ranks[mod], rslora)
        W0 = base_weight(mod) if base_weight is not None and any(s.magnitude is not None for s in srcs) else None
        factors[mod], info = _combine_one(srcs, weights, canon, ranks[mod], target_scaling, W0, options)
        infos.append((mod, ranks[mod], info["relative_error"], [s.adapter for s in srcs]))
    return fields, factors, infos


def _module_rank(srcs: list[Source], canon: str, rank: int | None) -> int:
    total = sum(s.factors.A.shape[0] for s in srcs)
    if canon == "cat":
        return total
    if rank is not None:
        return rank
    out, inp = srcs[0].factors.B.shape[0], srcs[0].factors.A.shape[1]
    return min(total, out, inp)


def _combine_one(srcs, weights, canon, rank, target_scaling, W0, options) -> tuple[Factors, dict]:
    """One module: plain factors through arithmetic.combine; with DoRA, effective deltas through combine_dense."""
    w = [weights[s.adapter] for s in srcs]
    dtype = srcs[0].factors.A.dtype
    if W0 is None:
        fs = [s.factors for s in srcs]
        return combine(fs, w, canon, rank=None if canon == "cat" else rank, target_scaling=target_scaling, **options)
    W0 = W0.to(srcs[0].factors.A.device)
    deltas = [dora_effective_delta(W0, s.factors, s.magnitude) if s.magnitude is not None
              else s.factors.scaling * (s.factors.B.float() @ s.factors.A.float()) for s in srcs]  # each (out, in)
    f, info = combine_dense([d.float() for d in deltas], w, canon, rank=rank, target_scaling=target_scaling, **options)
    return Factors(f.A.to(dtype), f.B.to(dtype), f.scaling), info


def new_config(first: LoraConfig, fields: dict, modules: list[str]) -> LoraConfig:
    """The combined adapter's config: the first adapter's, with the new rank/alpha and explicit targets."""
    return first.replace(**fields, target_modules=sorted(modules), alpha_pattern={}, exclude_modules=None,
                         layers_to_transform=None, layers_pattern=None, use_dora=False, modules_to_save=None,
                         bias="none", init_lora_weights=True, lora_fa=False, velora_config=None)


def make_report(method, new_name, names, weights, r, infos) -> CombineReport:
    report = CombineReport(method, new_name, list(names), [float(w) for w in weights], r)
    for mod, rank, err, used in infos:
        report.modules[mod] = {"rank": rank, "relative_error": err, "adapters": [names[i] for i in used]}
    return report


def check_kinds(names: list[str], cfgs: dict[str, LoraConfig], method: str) -> list[str]:
    """Adapter properties combining cannot carry over (shared by the model and folder versions)."""
    problems = []
    dora = [n for n in names if cfgs[n].use_dora]
    if dora and canonical(method) == "cat":
        problems.append(f"{dora} are DoRA adapters, which 'cat' cannot combine exactly (their effect is not "
                        "low-rank): use method='linear' (an SVD of their effective deltas) with a rank")
    blocks = [n for n in names if cfgs[n].use_bdlora is not None]
    if blocks:
        problems.append(f"{blocks} are BD-LoRA adapters (a block-diagonal factor), which combining would not keep "
                        "block-diagonal: combine plain LoRA adapters, or merge these ones")
    saved = [n for n in names if cfgs[n].modules_to_save]
    if saved:
        problems.append(f"{saved} have modules_to_save (full module copies, not low-rank deltas), which cannot be "
                        "combined: combine adapters trained without modules_to_save")
    for field, what in (("kasa_config", "KaSA (a learned diagonal, a truncated base)"),
                        ("trainable_token_indices", "trainable tokens (embedding rows, not low-rank deltas)")):
        odd = [n for n in names if getattr(cfgs[n], field) is not None]
        if odd:
            problems.append(f"{odd} are {what}, which combining cannot carry over: combine plain LoRA adapters")
    return problems
