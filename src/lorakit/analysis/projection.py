"""A model's tensors as θ = θ0 + P·θd: one shared trainable θd (d numbers) behind parametrizations.

    Projection(model, over="adapter"|"model", d, said=False, seed=0)
        every target tensor (the adapter's ".lora_" tensors, or all of the model's) becomes the output of
        a torch parametrization θ0_i + λ_i · P_i·θd, P_i a Fastfood map (fastfood.py) seeded per tensor;
        θ0_i is the tensor as it was, frozen; the only trainable parameters left are θd (and, with SAID,
        the per-tensor λ; Aghajanyan et al. 2020 §3: θd then has d - m entries for m tensors, so the
        total stays d). model.parameters() holds θd once (the Subspace module is shared), so the
        ordinary loop, clipping and optimizer train it as they train an adapter.
    .bake()     drop the parametrizations and write θ0 + P·θd into the tensors (tied ones stay tied):
                the model is then a plain model again, evaluated at full speed
    .restore()  θ0 back in every tensor, the parametrizations gone, requires_grad as it was

Why parametrizations and not "write θ0 + P·θd into the weights each step and project the gradient back":
the gradient then reaches θd by autograd through the Fastfood backward, clipping sees θd's gradient
(not the full one), and checkpoints / optimizers never see the D-sized tensors as trainable.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import LorakitError
from .fastfood import Fastfood

OVER = ("adapter", "model")


class Subspace(nn.Module):
    """θd (zeros: training starts at θ0) and, with SAID, one scale λ per tensor (ones)."""

    def __init__(self, d: int, tensors: int, said: bool):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(d))
        self.lam = nn.Parameter(torch.ones(tensors)) if said else None


class _Projected(nn.Module):
    """The parametrization of one tensor: original (θ0_i) -> θ0_i + λ_i · P_i·θd."""

    def __init__(self, space: Subspace, index: int, shape: torch.Size, seed: int):
        super().__init__()
        self.space, self.index, self.shape = space, index, tuple(shape)
        self.ff = Fastfood(max(1, int(torch.Size(shape).numel())), space.theta.numel(), seed)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        delta = self.ff(self.space.theta).view(self.shape)
        if self.space.lam is not None:
            delta = delta * self.space.lam[self.index]
        return original + delta.to(original.dtype)


def targets(model: nn.Module, over: str) -> list[tuple[str, nn.Parameter, list[tuple[nn.Module, str]]]]:
    """(name, parameter, [(module, attribute), ...]) per distinct tensor, in name order; a tied tensor
    lists every place that holds it."""
    if over not in OVER:
        raise LorakitError(f"--over {over!r}: expected one of {', '.join(OVER)}")
    found: dict[int, tuple[str, nn.Parameter, list]] = {}
    for mname, module in model.named_modules():
        for attr, p in module._parameters.items():
            if p is None or not p.is_floating_point():
                continue
            full = f"{mname}.{attr}" if mname else attr
            if over == "adapter" and ".lora_" not in full:
                continue
            found.setdefault(id(p), (full, p, []))[2].append((module, attr))
    if not found:
        raise LorakitError("--over adapter: the model has no adapter tensors (.lora_*); add an adapter first, "
                           "or use --over model" if over == "adapter" else "the model has no floating-point tensors")
    return sorted(found.values(), key=lambda t: t[0])


class Projection:
    """The target tensors of `model` trained as θ0 + P·θd (see the module docstring)."""

    def __init__(self, model: nn.Module, over: str, d: int, said: bool = False, seed: int = 0):
        self.model, self.found = model, targets(model, over)
        m = len(self.found)
        if said and d <= m:
            raise LorakitError(f"--said with d={d}: SAID spends one λ per tensor ({m} tensors here) out of d, "
                               f"so d must exceed {m}; use larger --dims or drop --said")
        self.trainable = {id(p): p.requires_grad for p in model.parameters()}
        self.theta0 = [p.detach().clone() for _, p, _ in self.found]
        device = self.found[0][1].device
        self.space = Subspace(d - m if said else d, m, said).to(device)
        for p in model.parameters():
            p.requires_grad_(False)
        for i, (_, p, places) in enumerate(self.found):
            proj = _Projected(self.space, i, p.shape, seed=seed * 1_000_003 + i).to(device)
            for module, attr in places:
                parametrize.register_parametrization(module, attr, proj, unsafe=True)
        self.attached = True

    @property
    def total(self) -> int:
        """The number of tensor entries projected (D)."""
        return sum(p.numel() for _, p, _ in self.found)

    def _detach(self) -> list[torch.Tensor]:
        """Remove the parametrizations; returns θ0 + P·θd per tensor (computed before removal)."""
        with torch.no_grad():
            values = [getattr(*places[0]).detach().clone() for _, _, places in self.found]
        for _, _, places in self.found:
            for module, attr in places:
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        self.attached = False
        return values

    def bake(self) -> None:
        values = self._detach() if self.attached else None
        if values is not None:
            with torch.no_grad():
                for (_, p, _), v in zip(self.found, values):
                    p.copy_(v)

    def restore(self) -> None:
        if self.attached:
            self._detach()
        with torch.no_grad():
            for (_, p, _), v in zip(self.found, self.theta0):
                p.copy_(v)
        for p in self.model.parameters():
            p.requires_grad_(self.trainable.get(id(p), False))
