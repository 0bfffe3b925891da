"""The checks behind adapter arithmetic: option and tensor problems, as lists of messages.

combine / combine_dense / truncate (arithmetic.py) collect these and raise one LorakitError naming every
problem and its fix; combine/modules.py runs option_problems before touching a model. The method names
(canonical ones and PEFT's aliases) live here too, as the options are checked against them.
"""

import math
from numbers import Real

import torch

from .factors import Factors

_CANONICAL = ("cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_ALIASES = {
    "svd": "linear",
    "dare": "dare_linear",
    "ties_svd": "ties",
    "dare_linear_svd": "dare_linear",
    "dare_ties_svd": "dare_ties",
    "magnitude_prune_svd": "magnitude_prune",
}
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
_MAJORITY_SIGNS = ("total", "frequency")


def canonical(method) -> str | None:
    if not isinstance(method, str):
        return None
    if method in _CANONICAL:
        return method
    return _ALIASES.get(method)


def option_problems(method, n, weights, rank, density, majority_sign, target_scaling, generator):
    """Problems with the options shared by combine and combine_dense (a list of messages)."""
    problems = []
    canon = canonical(method)
    if canon is None:
        valid = ", ".join(list(_CANONICAL) + list(_ALIASES))
        problems.append(f"unknown method {method!r}: use one of {valid}")
    if not isinstance(weights, (list, tuple)):
        problems.append(f"weights is a {type(weights).__name__}: give a list of floats, one per adapter")
    elif len(weights) != n:
        problems.append(f"weights has {len(weights)} entries but there are {n} adapters: give one weight per adapter")
    else:
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w):
                problems.append(f"weights[{i}] = {w!r} is not a finite number: give a float such as 1.0 or -1.0")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        problems.append(f"rank = {rank!r}: give an integer >= 1, or None for the default")
    if canon in _NEEDS_DENSITY:
        if density is None:
            problems.append(f"method {method!r} needs density, the fraction of entries kept: give one in (0, 1]")
    elif density is not None and canon is not None:
        problems.append(
            f"density = {density!r} has no effect with method {method!r}: drop it, or use "
            "'ties', 'dare_linear', 'dare_ties' or 'magnitude_prune'"
        )
    if density is not None and (
        isinstance(density, bool) or not isinstance(density, Real) or not 0 < density <= 1
    ):
        problems.append(f"density = {density!r} is outside (0, 1]: give the fraction of entries to keep, e.g. 0.5")
    if majority_sign not in _MAJORITY_SIGNS:
        problems.append(f"majority_sign = {majority_sign!r}: use 'total' or 'frequency'")
    if isinstance(target_scaling, bool) or not isinstance(target_scaling, Real) or not math.isfinite(
        target_scaling
    ) or target_scaling == 0:
        problems.append(
            f"target_scaling = {target_scaling!r}: give the new adapter's nonzero scaling (alpha/r, or alpha/sqrt(r))"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        problems.append(f"generator is a {type(generator).__name__}: pass a torch.Generator or None")
    return problems


def factor_problems(factors) -> list[str]:
    """Problems with the adapters: each well formed, all on the same module shape."""
    if not isinstance(factors, (list, tuple)) or len(factors) == 0:
        return ["factors is empty: pass a list with at least one Factors(A, B, scaling)"]
    problems, shapes = [], []
    for i, f in enumerate(factors):
        if not isinstance(f, Factors):
            problems.append(f"factors[{i}] is a {type(f).__name__}: wrap it as Factors(A, B, scaling)")
            continue
        A, B, s = f
        if not (isinstance(A, torch.Tensor) and A.dim() == 2 and A.is_floating_point()):
            problems.append(f"factors[{i}].A must be a 2-D float tensor (r, in), got {describe(A)}")
        elif not (isinstance(B, torch.Tensor) and B.dim() == 2 and B.is_floating_point()):
            problems.append(f"factors[{i}].B must be a 2-D float tensor (out, r), got {describe(B)}")
        elif A.shape[0] != B.shape[1] or A.shape[0] == 0:
            problems.append(
                f"factors[{i}]: A is {tuple(A.shape)} and B is {tuple(B.shape)}; "
                "A's rows and B's columns must both be the rank r >= 1 (A is (r, in), B is (out, r))"
            )
        elif not A.is_meta and not B.is_meta and not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            problems.append(f"factors[{i}] holds NaN/Inf: the adapter is broken (did its training diverge?)")
        else:
            shapes.append((i, (B.shape[0], A.shape[1]), A.device))
        if isinstance(s, bool) or not isinstance(s, Real) or not math.isfinite(s):
            problems.append(f"factors[{i}].scaling = {s!r} is not a finite number: give alpha/r (or alpha/sqrt(r))")
    return problems + _same_module_problems([(i, shape, dev) for i, shape, dev in shapes], "factors")


def delta_problems(deltas) -> list[str]:
    """Problems with dense deltas: 2-D float tensors of one shape."""
    if not isinstance(deltas, (list, tuple)) or len(deltas) == 0:
        return ["deltas is empty: pass a list with at least one (out, in) tensor"]
    problems, shapes = [], []
    for i, d in enumerate(deltas):
        if isinstance(d, torch.Tensor) and d.dim() == 2 and d.is_floating_point():
            shapes.append((i, tuple(d.shape), d.device))
        else:
            problems.append(f"deltas[{i}] must be a 2-D float tensor (out, in), got {describe(d)}")
    return problems + _same_module_problems(shapes, "deltas")


def _same_module_problems(shapes, name) -> list[str]:
    """All (index, (out, in), device) entries must agree with the first."""
    problems = []
    if not shapes:
        return problems
    i0, shape0, dev0 = shapes[0]
    for i, shape, dev in shapes[1:]:
        if shape != shape0:
            problems.append(
                f"{name}[{i}] updates an (out, in) = {shape} weight but {name}[{i0}] a {shape0} one: "
                "combine only adapters of the same module"
            )
        if dev != dev0:
            problems.append(f"{name}[{i}] is on {dev} but {name}[{i0}] on {dev0}: move them to one device")
    return problems


def generator_problems(generator, device, canon) -> list[str]:
    if isinstance(generator, torch.Generator) and canon in ("dare_linear", "dare_ties"):
        if generator.device.type != device.type:
            return [
                f"generator is on {generator.device} but the adapters on {device}: "
                f"create it with torch.Generator(device='{device.type}')"
            ]
    return []


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"
