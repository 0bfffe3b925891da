"""LoRA on one nn.Parameter of a module (PEFT's target_parameters, its ParamWrapper): W' = W + s·B·A.

For modules that hold a weight but are not a layer kind lorakit knows (a custom linear, a parameter used
in a hand-written forward). The LoraLayer wraps the *module* and adapts its parameter `name`:
    features   a 2-D parameter of shape (a, b) is seen as a linear weight, in = b, out = a (PEFT's rule),
               so A (r, b) and B (a, r) and ΔW = s·B·A has the parameter's shape
    forward    the module runs with the parameter read as W + Σ s·B·A of the live adapters (the stored
               parameter is not touched, gradients reach A and B); PEFT does the same with a
               torch parametrization registered around the call
    merge      W += ΔW in place, as any other kind
Not supported (as in PEFT: no dropout, DoRA, lora_bias or fan_in_fan_out; lorakit also refuses 3-D
expert tensors, which PEFT supports): refused with a LorakitError when the adapter is created.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LorakitError
from .bases import BaseKind
from .mha import adapted, reading


class ParamKind(BaseKind):
    """The base kind of a LoraLayer around a module whose parameter `parameter_name` is adapted."""

    name = family = "param"

    def __init__(self, parameter_name: str):
        self.parameter_name = parameter_name

    def matches(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, self.parameter_name, None), nn.Parameter)

    def repr_extra(self) -> str:
        return f", parameter_name={self.parameter_name!r}"

    def features(self, module: nn.Module) -> tuple[int, int]:
        shape = self.weight(module).shape
        return shape[1], shape[0]

    def weight(self, module: nn.Module) -> torch.Tensor:
        return getattr(module, self.parameter_name)

    def set_weight(self, module: nn.Module, W: torch.Tensor) -> None:
        self.weight(module).data.copy_(W)

    def prepare(self, module: nn.Module) -> None:
        p = getattr(module, self.parameter_name, None)
        if not isinstance(p, nn.Parameter):
            raise LorakitError(f"target_parameters: {type(module).__name__} has no parameter "
                               f"{self.parameter_name!r}")
        if p.dim() != 2:
            raise LorakitError(f"target_parameters: {type(module).__name__}.{self.parameter_name} has "
                               f"{p.dim()} dimensions; lorakit adapts 2-D parameters only (3-D expert tensors "
                               "are not supported yet); leave it out of target_parameters")


def check(dropout: float, variant, bias: bool) -> None:
    """What PEFT's ParamWrapper refuses, refused before the adapter exists."""
    problems = [what for what, bad in (("lora_dropout != 0 (x cannot be factored out of the weight)", dropout),
                                       ("use_dora=True", variant is not None), ("lora_bias=True", bias)) if bad]
    LorakitError.collect([f"LoRA on a parameter (target_parameters) does not work with {p}" for p in problems])


def forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs):
    """The module's output with its parameter read as W + the live adapters' deltas."""
    name = layer.base_kind.parameter_name
    W = adapted(layer, layer.dense_weight())
    if W is None:
        return layer.base_layer(x, *args, **kwargs)
    with reading(layer.base_layer, name, W):
        return layer.base_layer(x, *args, **kwargs)
