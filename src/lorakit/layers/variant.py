"""The Variant protocol: what a LoRA variant (DoRA, BD-LoRA, VeLoRA, ...) changes for one adapter of one layer.

LoraLayer (layer.py) calls these hooks; each variant object (dora.py, bdlora.py, kasa.py, mica.py,
monteclora.py, velora.py) overrides what it changes and keeps its own state (caches, merge factors).
The defaults are plain LoRA's behaviour. `layer` is the calling LoraLayer (typed nn.Module here, as
layer.py imports this file).
"""

from __future__ import annotations

import torch
from torch import nn


class Variant:
    """What a LoRA variant (DoRA) changes for one adapter of one layer. The layer calls it; it keeps
    its own state (caches, merge factors). Defaults are plain LoRA's behaviour."""

    name = "lora"
    lora_bias = False  # whether B may have a bias (PEFT's lora_bias) with this variant
    frozen: tuple[str, ...] = ()  # the layer's stores whose tensor of this adapter never trains (MiCA: lora_B)

    def stores(self, layer: nn.Module) -> tuple:
        """The variant's own per-adapter stores on the layer (name -> parameter or module), which train and
        freeze with the adapter's A and B (MonteCLoRA's samplers)."""
        return ()

    def check(self, layer: nn.Module) -> None:
        """Raise LorakitError if the variant cannot run on this layer (called before the adapter exists)."""

    def added(self, layer: nn.Module, name: str) -> None:
        """The adapter's A and B are initialised (in the base dtype, before any fp32 upcast)."""

    def apply(self, layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, dropout: nn.Module,
              owned: bool) -> tuple[torch.Tensor, bool]:
        raise NotImplementedError

    def factors(self, layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A (r, in) and B (out, r) as dense matrices (BD-LoRA stores one of them as its blocks)."""
        return layer.lora_A[name], layer.lora_B[name]

    def merged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, base: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """W with this adapter merged in; `base`: W without the adapters merged before it (None: W is that)."""
        raise NotImplementedError

    def unmerged_weight(self, layer: nn.Module, name: str, W: torch.Tensor, forget: bool = True) -> torch.Tensor:
        """W with this adapter (merged last) taken out; forget=False: it stays merged (a look, not an unmerge)."""
        raise NotImplementedError

    def reset(self) -> None:
        """The base weight changed (merge, unmerge, a new base): drop anything computed from it."""

    def upcast(self, layer: nn.Module, name: str) -> None:
        """The adapter's tensors were upcast to fp32 (on a half-precision base): upcast the variant's own."""

    def deleted(self, layer: nn.Module, name: str) -> None:
        """The adapter is being deleted: drop what the variant keeps on the layer for it."""
