"""Adapter arithmetic on a model: new named adapters made from the ones it already has.

    report = add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], "ab", combination_type="svd", svd_rank=16)
    report = combine_adapters(model, ["a", "b"], [0.7, 0.3], "linear", rank=16, new_name="ab")
    report = negate_adapter(model, "a", "minus_a")         # ΔW -> -ΔW, exact (task arithmetic)
    print(report)                                          # per-module truncation error, summarised

Per module, the adapters that target it are combined by lorakit.arithmetic: `cat` stacks the factors
(exact, rank Σ r_i); every other method forms its dense target from the ΔW_i and keeps the top
singular triplets (see arithmetic.py for linear/svd, ties, dare_*, magnitude_prune and PEFT's *_svd
aliases). A module that only some adapters target combines those present; the others count as 0.
The folder-level version, which needs no base model, is combine_dirs.py.

The new adapter's config. Per module rank: Σ r_i for cat; else `rank`, or by default Σ r_i capped
at min(out, in), which makes `linear` exact (PEFT's default is max r_i). The config's r is the most
common module rank; modules with another rank get a rank_pattern entry (escaped full name). Scaling:
use_rslora is taken from the first adapter and lora_alpha is chosen so that the scaling is exactly
1 at rank r (alpha = r, or sqrt(r) with rsLoRA); every module's factors are written for the scaling
its own (r, alpha) gives, so the new adapter reproduces the target ΔW in lorakit and in PEFT.
(PEFT's add_weighted_adapter sets alpha = r whatever use_rslora is, so with rsLoRA its result is
sqrt(r) times too large: PEFT issue #3761. tests/test_combine.py shows the difference.)

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
from torch import nn

from . import adapters
from .arithmetic import Factors, _canonical, _check_options, combine, combine_dense, dora_effective_delta
from .config import LoraConfig
from .errors import LorakitError
from .variants import lora_scaling


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
    problems = _check_options(method, len(names), weights, rank, density, majority_sign, 1.0, generator)
    if _canonical(method) == "cat" and rank is not None:
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
    canon = _canonical(method)
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
                         bias="none", init_lora_weights=True, lora_fa=False)


def make_report(method, new_name, names, weights, r, infos) -> CombineReport:
    report = CombineReport(method, new_name, list(names), [float(w) for w in weights], r)
    for mod, rank, err, used in infos:
        report.modules[mod] = {"rank": rank, "relative_error": err, "adapters": [names[i] for i in used]}
    return report


# -- on a model -------------------------------------------------------------------------------------------

def combine_adapters(model: nn.Module, names: list[str], weights: list[float], method: str = "linear",
                     rank: int | None = None, new_name: str = "combined", *, density: float | None = None,
                     majority_sign: str = "total", generator: torch.Generator | None = None,
                     activate: bool = False) -> CombineReport:
    """Add adapter `new_name` to `model`: the `method` combination of adapters `names` with `weights`.

    Methods: cat, linear (svd), ties, dare_linear (dare), dare_ties, magnitude_prune, and PEFT's *_svd
    names. rank: the new rank (default: exact where possible, see the module docstring). density: the
    kept fraction for ties/dare/magnitude_prune. The new adapter is active only with activate=True.
    """
    _check_model(model, names, weights, method, rank, new_name, density, majority_sign, generator)
    cfgs = adapters.configs(model)
    sources = _model_sources(model, names)
    layers = dict(adapters.lora_layers(model))
    fields, factors, infos = combine_modules(
        sources, list(weights), method, rank, cfgs[names[0]].use_rslora,
        base_weight=lambda mod: layers[mod].dense_weight(), density=density, majority_sign=majority_sign,
        generator=generator)
    config = new_config(cfgs[names[0]], fields, list(factors))
    _install(model, config, factors, new_name, activate)
    return make_report(method, new_name, names, weights, fields["r"], infos)


def _check_model(model, names, weights, method, rank, new_name, density, majority_sign, generator) -> None:
    cfgs = adapters.configs(model)
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise LorakitError(f"adapters must be a non-empty list of adapter names (got {names!r}); "
                           f"this model has {sorted(cfgs) or 'none'}")
    problems = [f"no adapter named {n!r}; this model has {sorted(cfgs) or 'none'}" for n in dict.fromkeys(names)
                if n not in cfgs]
    problems += check_options(names, weights, method, rank, density, majority_sign, generator)
    if not isinstance(new_name, str) or not new_name:
        problems.append(f"the new adapter's name must be a non-empty string (got {new_name!r})")
    elif new_name in cfgs:
        problems.append(f"an adapter named {new_name!r} already exists; pick another name or delete it first")
    known = [n for n in names if n in cfgs]
    problems += _check_kinds(known, {n: cfgs[n] for n in known}, method)
    dora = [n for n in known if cfgs[n].use_dora]
    if dora and any(layer.merged_adapters for _, layer in adapters.lora_layers(model)):
        problems.append(f"DoRA adapter(s) {dora} need the base weights, but some adapters are merged into them; "
                        "call unmerge() first")
    LorakitError.collect(problems, f"combining adapters {list(names)!r}: {len(problems)} problem(s):")


def _check_kinds(names: list[str], cfgs: dict[str, LoraConfig], method: str) -> list[str]:
    """Adapter properties combining cannot carry over (shared by the model and folder versions)."""
    problems = []
    dora = [n for n in names if cfgs[n].use_dora]
    if dora and _canonical(method) == "cat":
        problems.append(f"{dora} are DoRA adapters, which 'cat' cannot combine exactly (their effect is not "
                        "low-rank): use method='linear' (an SVD of their effective deltas) with a rank")
    saved = [n for n in names if cfgs[n].modules_to_save]
    if saved:
        problems.append(f"{saved} have modules_to_save (full module copies, not low-rank deltas), which cannot be "
                        "combined: combine adapters trained without modules_to_save")
    return problems


def _model_sources(model: nn.Module, names: list[str]) -> dict[str, list[Source]]:
    sources: dict[str, list[Source]] = {}
    for mod, layer in adapters.lora_layers(model):
        for i, name in enumerate(names):
            if name in layer.lora_A:
                f = Factors(layer.lora_A[name].detach(), layer.lora_B[name].detach(), layer.scaling[name])
                m = layer.lora_magnitude_vector[name].detach() if name in layer.lora_magnitude_vector else None
                sources.setdefault(mod, []).append(Source(i, f, m, layer.kind))
    return sources


def _install(model: nn.Module, config: LoraConfig, factors: dict[str, Factors], name: str, activate: bool) -> None:
    """Add adapter `name` with `config` and copy the factors in."""
    adapters.add_adapter(model, config.replace(init_lora_weights=False), name, activate=activate)
    adapters.configs(model)[name] = config
    with torch.no_grad():
        for mod, f in factors.items():
            layer = model.get_submodule(mod)
            if not math.isclose(layer.scaling[name], f.scaling, rel_tol=1e-6):
                raise AssertionError(f"{mod}: scaling {layer.scaling[name]} != {f.scaling}")  # a lorakit bug
            layer.lora_A[name].copy_(f.A)
            layer.lora_B[name].copy_(f.B)


def add_weighted_adapter(model: nn.Module, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: int | None = None, svd_clamp=None,
                         svd_full_matrices: bool = True, svd_driver: str | None = None,
                         density: float | None = None, majority_sign_method: str = "total",
                         generator: torch.Generator | None = None) -> CombineReport:
    """PEFT's LoraModel.add_weighted_adapter over a plain model, with lorakit's math.

    Differences from PEFT: `linear`, `ties`, `dare_*`, `magnitude_prune` work on the dense ΔW_i (PEFT's
    combine A and B separately and need equal ranks); svd_rank=None keeps the exact rank (PEFT: max r_i);
    rsLoRA adapters get the right scaling; an existing adapter_name is an error (PEFT silently returns).
    svd_full_matrices and svd_driver are accepted and unused (lorakit takes a thin SVD); svd_clamp is
    not supported. Returns the report (PEFT returns None).
    """
    if svd_clamp is not None:
        raise LorakitError(f"svd_clamp={svd_clamp!r} is not supported by lorakit: drop it (the factors are "
                           "split evenly between A and B, so clamping is rarely needed)")
    return combine_adapters(model, adapters, weights, combination_type, svd_rank, adapter_name, density=density,
                            majority_sign=majority_sign_method, generator=generator)


def negate_adapter(model: nn.Module, name: str, new_name: str, rank: int | None = None) -> CombineReport:
    """Add `new_name` = −ΔW of adapter `name` (task arithmetic: 'forget' what `name` taught).

    Plain LoRA: exact (B flipped, same ranks). DoRA: a plain LoRA adapter whose ΔW is the SVD of minus
    the effective delta, rank `rank` (default: the adapter's rank); the report gives the error.
    """
    cfgs = adapters.configs(model)
    if name in cfgs and cfgs[name].use_dora:
        return combine_adapters(model, [name], [-1.0], "linear", rank, new_name)
    if rank is not None:
        raise LorakitError(f"rank={rank}: negating a plain LoRA adapter is exact at its own rank; drop the rank "
                           "(or combine_adapters(model, [name], [-1.0], 'linear', rank, new_name) to re-rank)")
    return combine_adapters(model, [name], [-1.0], "cat", None, new_name)
