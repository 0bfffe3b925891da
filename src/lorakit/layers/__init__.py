"""The ground floor: the LoRA math on one layer. Imports torch and lorakit.errors only.

    layer.py      LoraLayer (add/delete, forward, delta weight), the per-call row plan (a context variable)
    merging.py    merge / unmerge: adapters folded into the base weight (and bias) and taken out again
    variant.py    the Variant protocol: the hooks a variant object (DoRA, BD-LoRA, ...) overrides
    bases.py      base kinds (Linear, Conv1D, Embedding, Conv1d/2d/3d, MultiheadAttention) behind one registry
    mha.py        nn.MultiheadAttention: in_proj and out_proj adapters, the adapted attention forward
    pissa.py      PiSSA initialisation from the base weight's SVD
    param.py      LoRA on one nn.Parameter of a module (PEFT's target_parameters)
    bnb.py        bitsandbytes 4/8-bit base kinds, registered like any other
    gptq.py       GPTQ and AWQ base kinds (gptqmodel's quantized linears, as transformers loads them)
    dora.py       DoRA (linear, conv, embedding) as a variant object that owns its caches
    kasa.py       KaSA: the base weight's SVD truncated at init, a learnable diagonal between A and B
    bdlora.py     BD-LoRA: a block-diagonal A or B (PEFT's BlockDiagonalLinear storage), a variant object
    mica.py       MiCA: B from the base weight's minor singular vectors, frozen; a variant object
    velora.py     VeLoRA: A's backward from compressed inputs (a variant object, linear layers)
    monteclora.py MonteCLoRA as a variant object with its sampler (sampled A in training, plain LoRA in eval)
    mixed.py      per-row adapters in one forward (RowPlan, the stacked and segment paths; modules_to_save rows)
    tokens.py     per-token adapters in one flat (1, N) forward (TokenPlan, for serving steps)
    pool.py       slot pools: per layer and rank, adapters' factors in slots (gathered per token)
    bgmv.py       the compiled BGMV kernel (bgmv.cpp): gathered tokens read the pools in place (CPU, fp32)
    fused.py      the training fast path: one autograd node per LoRA linear
    recompute.py  training memory: rebuild a LoRA layer's input in backward from what the base keeps
"""

from . import bnb  # noqa: F401  (registers the bitsandbytes base kinds)
from . import gptq  # noqa: F401  (registers the GPTQ / AWQ base kinds)
from .bases import BaseKind, dense_weight, kind_of, register
from .bdlora import BdLora
from .dora import DoRA
from .kasa import KaSA
from .fused import _LoraLinear  # noqa: F401  (old import path: lorakit.layers._LoraLinear)
from .layer import LoraLayer, current_row_plan, using_row_plan
from .mica import MiCA
from .mixed import BASE, RowPlan, Stacks, module_rows_forward
from .monteclora import MonteCLoRA
from .param import ParamKind
from .pool import Pools
from .tokens import TokenPlan
from .variant import Variant
from .velora import VeLoRA


def layer_kind(module) -> str | None:
    """'linear' | 'conv1d' | 'embedding' | 'conv' | 'mha' for a module LoRA can wrap, else None."""
    kind = kind_of(module)
    return kind.family if kind is not None else None


__all__ = ["BASE", "BaseKind", "BdLora", "DoRA", "KaSA", "LoraLayer", "MiCA", "MonteCLoRA",
           "ParamKind", "Pools", "RowPlan", "Stacks", "TokenPlan", "Variant", "VeLoRA",
           "current_row_plan", "module_rows_forward",
           "dense_weight", "kind_of", "layer_kind", "register", "using_row_plan"]
