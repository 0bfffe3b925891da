"""PiSSA initialisation (Meng et al. 2024): A and B from the top-r singular triplets of the base weight.

The base keeps the residual W - s·B·A, so the adapted layer starts exactly at W. init "pissa" takes a full
SVD; "pissa_niter_K" torch.svd_lowrank with K subspace iterations (PEFT's fast variant).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LorakitError


@torch.no_grad()
def init(layer: nn.Module, name: str, how: str) -> None:
    """Set adapter `name`'s A (r, in) and B (out, r) of `layer` from W's SVD; write the residual into the base."""
    if layer.kind in ("embedding", "conv"):
        raise LorakitError("init_lora_weights='pissa' is supported for linear layers only")
    W = layer.dense_weight().float()  # (out, in)
    r, s = layer.r[name], layer.scaling[name]
    if how == "pissa":
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(W, q=r, niter=int(how.rsplit("_", 1)[1]))
        Vh = V.T
    S = S / s
    layer.lora_A[name].data = (torch.diag(S.sqrt()) @ Vh).contiguous()
    layer.lora_B[name].data = (U @ torch.diag(S.sqrt())).contiguous()
    residual = W - s * layer.lora_B[name] @ layer.lora_A[name]
    layer._set_dense_weight(residual)
