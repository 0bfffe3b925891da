"""Attention for a flat batch: a batch's examples laid end to end in one row, no padding.

A padded batch (B, T) runs every pad position through every linear layer of the model: the
4-example chat batch of benchmarks/bench_step.py is 18% padding. A flat batch (1, N) holds only the
N real tokens; position_ids restart at 0 for each example, so each example must attend only to
itself, causally. transformers can express that as an (N, N) block-diagonal mask (it detects the
restarting position_ids), but that costs N² elements and sends sdpa to its masked path, which on
CPU made packed rows slower than padding. Here attention runs once per example with is_causal
instead (sdpa's fused kernel, on CPU too): Σ nᵢ² work, no mask, no padding.

The examples' bounds travel as transformers' flash-attention kwargs (cu_seq_lens_q/k: int32 (k+1,)
cumulative lengths; max_length_q/k), so a flat batch is exact under three implementations:
  - inside `flat_attention(model)`: this file's per-example sdpa;
  - attn_implementation="flash_attention_2": transformers' own varlen kernel reads the same kwargs;
  - plain "sdpa"/"eager": transformers builds the block mask from position_ids (slower, same result).

Public: supports, flat_attention, for_batch, NAME.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv

from ..errors import LorakitError

NAME = "lorakit_flat"
_NATIVE_VARLEN = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def supports(model) -> bool:
    """Whether `model` (a transformers causal LM, or a PeftModel over one) can take flat batches:
    its attention goes through transformers' attention interface, so the kwargs reach it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    causal = [m.is_causal for m in base.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    return (getattr(base, "_supports_attention_backend", False) and config is not None
            and bool(causal) and all(causal)  # BERT-like encoders attend both ways
            and getattr(config, "attn_logit_softcapping", None) is None  # Gemma 2: not in sdpa
            and config._attn_implementation in ("sdpa", "eager", *_NATIVE_VARLEN))


@contextlib.contextmanager
def flat_attention(model):
    """Within: the model's attention treats a flat batch's examples separately (needs the batch's
    cu_seq_lens_q). Hold it over forward AND backward: gradient checkpointing re-runs the forward
    during backward and reads the implementation again. A model already on a flash-attention
    implementation keeps it (it reads the same kwargs)."""
    with switched([c for c in _configs(model) if c._attn_implementation not in _NATIVE_VARLEN], NAME):
        yield


@contextlib.contextmanager
def switched(configs: list, name: str):
    """Within: every config in `configs` runs attention implementation `name` (a registered
    AttentionInterface); each config's own value comes back after, even on an exception."""
    saved = [(c, c._attn_implementation_internal) for c in configs]
    for config, _ in saved:
        config._attn_implementation_internal = name  # the plain field: the setter would validate `name`
    try:
        yield
    finally:
        for config, implementation in saved:
            config._attn_implementation_internal = implementation


def for_batch(model, batch: dict):
    """flat_attention(model) for a flat batch (it has cu_seq_lens_q), else a context that does nothing."""
    return flat_attention(model) if "cu_seq_lens_q" in batch else contextlib.nullcontext()


_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its configs, found once


def _configs(model) -> list:
    """Every config object the model's modules read their attention implementation from (walking
    the modules costs ~2.5 ms on a 30-layer model: once per model, not once per micro-batch)."""
    if model not in _CONFIGS:
        configs = (getattr(m, "config", None) for m in model.modules())
        found = {id(c): c for c in configs if hasattr(c, "_attn_implementation_internal")}
        _CONFIGS[model] = list(found.values())
    return _CONFIGS[model]


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
               sliding_window=None, **kwargs):
    """query (1, Hq, N, D), key/value (1, Hkv, N, D) -> ((1, N, Hq, D), None), as transformers'
    sdpa_attention_forward; each example [cu[i], cu[i+1]) attends causally to itself only."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1:
        raise LorakitError("flat attention needs a flat batch: input_ids (1, N) and cu_seq_lens_q "
                           "(batching.collate(..., flat=True) makes one)")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise LorakitError(f"{type(module).__name__} uses attention soft-capping or sinks, which flat "
                           "attention does not implement; train it with flat batches off")
    if key.shape[1] != query.shape[1]:  # GQA: sdpa's fused CPU kernel wants equal head counts
        key, value = (repeat_kv(t, query.shape[1] // key.shape[1]) for t in (key, value))
    bounds = _bounds(cu)
    outs = [_one_example(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout if module.training else 0.0,
                         scaling, sliding_window) for s, e in zip(bounds[:-1], bounds[1:])]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (1, Hq, N, D)
    return out.transpose(1, 2).contiguous(), None


# The last bounds read in this context: (tensor, its version counter, its values). Per thread / task,
# so concurrent forwards never read each other's.
_LAST_BOUNDS: contextvars.ContextVar = contextvars.ContextVar("lorakit_flat_bounds", default=(None, -1, []))


def _bounds(cu: torch.Tensor) -> list[int]:
    """cu as a list, read once per batch rather than once per layer (on a GPU each read is a sync);
    the version counter catches a tensor changed in place."""
    last = _LAST_BOUNDS.get()
    if last[0] is not cu or last[1] != cu._version:
        last = (cu, cu._version, cu.tolist())
        _LAST_BOUNDS.set(last)
    return last[2]


def _one_example(q, k, v, dropout: float, scale, window):
    """Causal attention of one example (1, H, n, D); with a sliding window of W keys (the query's
    own included, transformers' convention) when the example is longer than W."""
    n = q.shape[2]
    if window is None or n <= window:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale)
    i = torch.arange(n, device=q.device)
    keep = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)  # (n, n): kv <= q, q - kv < W
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout, scale=scale)


AttentionInterface.register(NAME, _attention)
