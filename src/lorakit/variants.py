"""LoRA variants that keep the plain layer's shape: rsLoRA scaling, DoRA, LoRA-FA and LoRA+.

DoRA (Liu et al. 2024) splits the adapted weight into a magnitude m (out,) and a direction:
    W' = m · (W0 + s·BA) / ||W0 + s·BA||_row,   the norm per output row, detached from the graph.
PEFT adds (m/n - 1)·(W0·x) + (m/n)·s·B·A·x to the base output, n = ||W0 + s·BA||_row; we compute the
same value as (m/n)·(W0·x) + bias + B'·A·x with B' = (m/n)·s·B, i.e. the per-row factor folded into
the small B (see dora_apply).
We never build W0 + s·BA to get n: with the rows' squared norms of W0 cached once,
    n² = ||W0||² + 2s·rowsum((W0·Aᵀ) ⊙ B) + s²·rowsum((B·A·Aᵀ) ⊙ B),
which costs O(out·in·r) with (out, r) temporaries instead of an (out, in) one. Outside training the
norm is cached until A, B or W0 change (PyTorch's version counters tell), so DoRA inference costs one
extra elementwise product over LoRA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha/r, or alpha/sqrt(r) for rsLoRA (Kalajdzievski 2023), which keeps updates stable at high r."""
    return alpha / math.sqrt(r) if rslora else alpha / r


# -- DoRA ------------------------------------------------------------------------------------------------

def dora_weight_norm(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float,
                     w_sq: torch.Tensor | None = None) -> torch.Tensor:
    """||W + s·B·A|| per output row, shape (out,), without materialising the (out, in) sum.

    W (out, in), A (r, in), B (out, r). w_sq: cached ||W||² per row.
    """
    A, B = A.detach().to(W.dtype), B.detach().to(W.dtype)
    if w_sq is None:
        w_sq = W.pow(2).sum(dim=1)  # (out,)
    cross = ((W @ A.T) * B).sum(dim=1)  # (out, r) -> (out,)
    lora_sq = ((B @ (A @ A.T)) * B).sum(dim=1)  # (out,)
    return (w_sq + 2 * s * cross + s * s * lora_sq).clamp_min(0).sqrt()


def _cached_norm(layer: nn.Module, name: str, W: torch.Tensor) -> torch.Tensor:
    """The detached DoRA norm, recomputed only when W, A or B changed since the last call."""
    A, B = layer.lora_A[name], layer.lora_B[name]
    key = (W.data_ptr(), W._version, A.data_ptr(), A._version, B.data_ptr(), B._version, W.dtype)
    hit = layer._dora_cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    wkey = ("w_sq", W.data_ptr(), W._version, W.dtype)
    w_hit = layer._dora_cache.get("__w_sq__")
    with torch.no_grad():
        w_sq = w_hit[1] if w_hit is not None and w_hit[0] == wkey else W.pow(2).sum(dim=1)
        norm = dora_weight_norm(W, A, B, layer.scaling[name], w_sq)
    if not torch.is_inference_mode_enabled():  # inference tensors cannot be reused under autograd
        layer._dora_cache["__w_sq__"] = (wkey, w_sq)
        layer._dora_cache[name] = (key, norm)
    return norm


def dora_apply(layer: nn.Module, name: str, x: torch.Tensor, result: torch.Tensor, dropout: nn.Module,
               owned: bool = False) -> tuple[torch.Tensor, bool]:
    """The output with DoRA adapter `name` applied to the output so far, `result`; (new result, owned).

    PEFT adds (k - 1)·base + k·s·B·A·x to `result`, k = m/||W0 + s·BA|| (1, out), base = result without
    the bias. That equals k·base + bias + (k·s)·B·A·x, which we compute with the per-row factor k·s folded
    into B (an (out, r) product instead of (tokens, out) ones): one addcmul, and a single (tokens, out)
    tensor saved for backward (PEFT's form saves two). Same value up to float rounding (~1 ulp of the
    output). Without autograd and with `owned`, in place: result·k, then += (x·Aᵀ)·(k·s·B)ᵀ.
    """
    A, B, s, m = layer.lora_A[name], layer.lora_B[name], layer.scaling[name], layer.lora_magnitude_vector[name]
    W = layer.dense_weight().to(x.dtype)  # (out, in)
    norm = _cached_norm(layer, name, W)
    scale = m / norm  # (out,)
    bias = getattr(layer.base_layer, "bias", None)
    if not (isinstance(dropout, nn.Identity) or not layer.training):
        # The base must see the same dropped-out x as the adapter: PEFT's form, nothing to fuse.
        x = dropout(x)
        return result + _dora_delta(F.linear(x, W), F.linear(F.linear(x, A), B), scale, s), True
    if not result.dtype == x.dtype == A.dtype == m.dtype:  # mixed precision (autocast, quantized base)
        base_out = result - bias if bias is not None else result  # W0·x without the bias
        return result + _dora_delta(base_out, F.linear(F.linear(x, A), B), scale, s), True
    B_scaled = B * (scale * s).unsqueeze(1)  # (out, r): k·s·B
    after_A = F.linear(x, A)  # (..., r)
    if owned and bias is None and result.is_contiguous():
        out2d = result.view(-1, result.shape[-1])  # (N, out)
        out2d.mul_(scale).addmm_(after_A.reshape(-1, after_A.shape[-1]), B_scaled.T)
        return result, True
    lora_out = F.linear(after_A, B_scaled)  # (..., out)
    if bias is not None:
        return torch.addcmul(lora_out + bias, result - bias, scale), True
    return torch.addcmul(lora_out, result, scale), True


def _dora_delta(base_out: torch.Tensor, lora_out: torch.Tensor, scale: torch.Tensor, s: float) -> torch.Tensor:
    """PEFT's DoRA term, op for op: (k - 1)·base + k·lora·s."""
    scale = scale.view(1, -1)
    return (scale - 1) * base_out + scale * lora_out * s


@torch.no_grad()
def dora_merged_weight(layer: nn.Module, name: str, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m/||W+ΔW|| · (W + ΔW), the factor m/||W+ΔW||) for merging; the factor is kept for unmerge."""
    delta = layer.delta_weight(name).to(W.dtype)
    combined = W + delta
    norm = torch.linalg.norm(combined, dim=1)
    factor = layer.lora_magnitude_vector[name].to(W.dtype) / norm  # (out,)
    return factor.view(-1, 1) * combined, factor


# -- LoRA-FA ---------------------------------------------------------------------------------------------

def freeze_A(layer: nn.Module, name: str) -> None:
    """LoRA-FA (Zhang et al. 2023): A stays at its random init; only B (and DoRA's m) train."""
    layer.lora_A[name].requires_grad_(False)


# -- LoRA+ -----------------------------------------------------------------------------------------------

def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                           embedding_lr: float = 1e-6) -> list[dict]:
    """LoRA+ (Hayou et al. 2024): B learns `ratio` times faster than A.

    Groups: A and other trainable weights at lr; B at lr·ratio; embedding adapters at embedding_lr;
    1-D parameters (biases, DoRA magnitudes) without weight decay. Pass the result to any optimizer.
    """
    from .layers import LoraLayer

    embedding_params = {id(p) for mod in model.modules() if isinstance(mod, LoraLayer) and mod.kind == "embedding"
                        for p in list(mod.lora_A.values()) + list(mod.lora_B.values())}
    groups = {"A": [], "B": [], "embedding": [], "no_decay": []}
    for pname, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_params:
            groups["embedding"].append(p)
        elif ".lora_B." in pname:
            groups["B"].append(p)
        elif p.ndim < 2:
            groups["no_decay"].append(p)
        else:
            groups["A"].append(p)
    settings = {"A": (lr, weight_decay), "B": (lr * ratio, weight_decay),
                "embedding": (embedding_lr, weight_decay), "no_decay": (lr, 0.0)}
    return [{"params": ps, "lr": settings[k][0], "weight_decay": settings[k][1], "name": k}
            for k, ps in groups.items() if ps]


def lora_plus_optimizer(model: nn.Module, lr: float, ratio: float = 16.0, weight_decay: float = 0.0,
                        embedding_lr: float = 1e-6, **adamw_kwargs) -> torch.optim.AdamW:
    """AdamW over lora_plus_param_groups (what PEFT's create_loraplus_optimizer builds)."""
    return torch.optim.AdamW(lora_plus_param_groups(model, lr, ratio, weight_decay, embedding_lr), lr=lr,
                             **adamw_kwargs)
