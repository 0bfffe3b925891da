"""Adapter arithmetic on a model: new named adapters made from the ones it already has.

    report = add_weighted_adapter(model, ["a", "b"], [0.7, 0.3], "ab", combination_type="svd", svd_rank=16)
    report = combine_adapters(model, ["a", "b"], [0.7, 0.3], "linear", rank=16, new_name="ab")
    report = negate_adapter(model, "a", "minus_a")         # ΔW -> -ΔW, exact (task arithmetic)
    print(report)                                          # per-module truncation error, summarised

The math and the new adapter's config are modules.py's; the folder-level version, which needs no base
model, is folders.py.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..adapters import manage
from ..config import LoraConfig
from ..errors import LorakitError
from .arithmetic import Factors
from .modules import CombineReport, Source, check_kinds, check_options, combine_modules, make_report, new_config


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
    cfgs = manage.configs(model)
    sources = _model_sources(model, names)
    layers = dict(manage.lora_layers(model))
    fields, factors, infos = combine_modules(
        sources, list(weights), method, rank, cfgs[names[0]].use_rslora,
        base_weight=lambda mod: layers[mod].dense_weight(), density=density, majority_sign=majority_sign,
        generator=generator)
    config = new_config(cfgs[names[0]], fields, list(factors))
    _install(model, config, factors, new_name, activate)
    return make_report(method, new_name, names, weights, fields["r"], infos)


def _check_model(model, names, weights, method, rank, new_name, density, majority_sign, generator) -> None:
    cfgs = manage.configs(model)
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
    problems += check_kinds(known, {n: cfgs[n] for n in known}, method)
    for mod, layer in manage.lora_layers(model):
        broken = [n for n in dict.fromkeys(known) if n in layer.lora_A and not all(
            torch.isfinite(t).all() for t in (layer.lora_A[n], layer.lora_B[n]))]
        problems += [f"adapter {n!r} holds NaN/Inf in {mod}: it is broken (did its training diverge?)" for n in broken]
    biased = [n for n in dict.fromkeys(known) if cfgs[n].lora_bias or any(
        n in layer.lora_bias for _, layer in manage.lora_layers(model))]
    problems += [f"adapter {n!r} has lora_bias=True: combining adapters with a B bias is not supported; combine "
                 "adapters trained with lora_bias=False" for n in biased]
    dora = [n for n in known if cfgs[n].use_dora]
    if dora and any(layer.merged_adapters for _, layer in manage.lora_layers(model)):
        problems.append(f"DoRA adapter(s) {dora} need the base weights, but some adapters are merged into them; "
                        "call unmerge() first")
    LorakitError.collect(problems, f"combining adapters {list(names)!r}: {len(problems)} problem(s):")


def _model_sources(model: nn.Module, names: list[str]) -> dict[str, list[Source]]:
    sources: dict[str, list[Source]] = {}
    for mod, layer in manage.lora_layers(model):
        for i, name in enumerate(names):
            if name in layer.lora_A:
                f = Factors(layer.lora_A[name].detach(), layer.lora_B[name].detach(), layer.scaling[name])
                m = layer.lora_magnitude_vector[name].detach() if name in layer.lora_magnitude_vector else None
                sources.setdefault(mod, []).append(Source(i, f, m, layer.kind))
    return sources


def _install(model: nn.Module, config: LoraConfig, factors: dict[str, Factors], name: str, activate: bool) -> None:
    """Add adapter `name` with `config` and copy the factors in."""
    manage.add_adapter(model, config.replace(init_lora_weights=False), name, activate=activate)
    manage.configs(model)[name] = config
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
    cfgs = manage.configs(model)
    if name in cfgs and cfgs[name].use_dora:
        return combine_adapters(model, [name], [-1.0], "linear", rank, new_name)
    if rank is not None:
        raise LorakitError(f"rank={rank}: negating a plain LoRA adapter is exact at its own rank; drop the rank "
                           "(or combine_adapters(model, [name], [-1.0], 'linear', rank, new_name) to re-rank)")
    return combine_adapters(model, [name], [-1.0], "cat", None, new_name)
