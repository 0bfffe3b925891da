"""LoRA on nn.MultiheadAttention, as PEFT's lora.MultiheadAttention: adapters on in_proj and out_proj.

nn.MultiheadAttention holds q/k/v packed in one parameter, in_proj_weight (3·E, E), and never calls its
out_proj's forward (it reads out_proj.weight into F.multi_head_attention_forward). So, as in PEFT:
  * the LoraLayer around the attention (base kind "mha", bases.py) adapts in_proj_weight: A (r, E), B (3E, r);
  * its out_proj is replaced by a plain linear LoraLayer that only holds that layer's adapters, created
    and deleted with the attention's (every adapter of the attention has both);
  * forward runs the attention with W_in + Σ s·B·A and W_out + Σ s·B·A of the live adapters (no dropout,
    as PEFT, whose forward merges and unmerges around the call). Instead of merging in place we let the
    attention read the adapted weights for the call (reading), so gradients reach A and B and the stored
    weights are never touched. PEFT 0.21.2 adds out_proj's delta twice (its merge adds it by hand, then
    calls out_proj.merge(), which adds it again; huggingface/peft#3774 fixes that); we add it once.
RNG use follows PEFT: its first adapter initialises out_proj's adapter, then in_proj's, then out_proj's
again (its constructor and update_layer both create it); later adapters: in_proj's, then out_proj's.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import LorakitError


def check(layer: nn.Module, variant, bias: bool) -> None:
    """What PEFT's lora.MultiheadAttention refuses, refused up front."""
    if variant is not None:
        raise LorakitError("DoRA on nn.MultiheadAttention is not supported (nor by PEFT); set use_dora=False or "
                           "leave the attention out of target_modules")
    if bias:
        raise LorakitError("lora_bias=True is not supported for nn.MultiheadAttention; set lora_bias=False")


def add(layer: nn.Module, name: str, add_in_proj, **kwargs) -> None:
    """Create adapter `name` on in_proj (add_in_proj()) and on out_proj, drawing the RNG as PEFT does."""
    out_proj = layer.base_layer.out_proj
    if layer.generation == 0:  # PEFT's constructor: out_proj's adapter first, created again below
        out_proj.add(name, **kwargs)
        out_proj.delete(name)
    add_in_proj()
    out_proj.add(name, **kwargs)


def adapted(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor | None:
    """weight + the deltas of `layer`'s live adapters, or None when none is live."""
    live = [] if layer.disabled else layer.live_adapters()
    if not live:
        return None
    return weight + sum(layer.delta_weight(n).to(weight.dtype) for n in live)


@contextlib.contextmanager
def reading(module: nn.Module, name: str, value: torch.Tensor):
    """Within the block, `module.<name>` reads `value`: an instance attribute shadows the registered parameter
    (which stays registered, in place), as FSDP's use_orig_params views do; so it works under FSDP too,
    where torch.func.functional_call's swap of the registered parameter would be shadowed itself."""
    attrs, missing = module.__dict__, object()
    old = attrs.get(name, missing)
    attrs[name] = value
    try:
        yield
    finally:
        if old is missing:
            del attrs[name]
        else:
            attrs[name] = old


def forward(layer: nn.Module, query: torch.Tensor, *args, **kwargs):
    """The attention's output with the live adapters of in_proj and out_proj applied."""
    base = layer.base_layer
    out_proj = base.out_proj
    with contextlib.ExitStack() as stack:
        w_in = adapted(layer, base.in_proj_weight)
        if w_in is not None:
            stack.enter_context(reading(base, "in_proj_weight", w_in))
        w_out = adapted(out_proj, out_proj.base_layer.weight)
        if w_out is not None:
            stack.enter_context(reading(out_proj.base_layer, "weight", w_out))
        return base(query, *args, **kwargs)
