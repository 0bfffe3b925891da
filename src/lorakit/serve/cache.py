"""The KV cache of the serving engine and the attention function that reads and writes it.

Each sequence owns, per layer, preallocated K and V buffers (1, kv_heads, capacity, head_dim) that
grow by doubling; attention reads the views [:, :, :length] (bitwise the same result as a
concatenated tensor, and no copy per token). A step is one flat row (1, N) of many sequences'
tokens; the attention function, registered with transformers' AttentionInterface under NAME, runs
once per sequence through transformers' own sdpa_attention_forward with the shapes a single
`generate` call would use (a prefill from position 0: is_causal, no mask; a decode: one query, no
mask; a prompt chunk after earlier chunks: a bottom-right causal mask). So a sequence alone in a
step gets the numbers `generate` gets. The prompt is never recomputed: each token's K/V is written
once, when it is first fed.

The step being run reaches the attention function through a context variable (`running(step)`),
set by the engine thread around its forward; nothing per call lives in a module global.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..errors import LorakitError
from ..models.attention import switched

NAME = "lorakit_serve"
_STEP: contextvars.ContextVar = contextvars.ContextVar("lorakit_serve_step", default=None)


class SequenceKV:
    """One sequence's K/V buffers, per layer index; `length` tokens are valid (all layers alike)."""

    def __init__(self):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.length = 0  # tokens whose K/V are stored (advanced by the engine after each step)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store key/value (1, h, t, D) at [length, length + t); the views (1, h, length + t, D)."""
        end = self.length + key.shape[2]
        buf_k = self.k.get(layer)
        if buf_k is None or buf_k.shape[2] < end:
            cap = max(16, end, 2 * (buf_k.shape[2] if buf_k is not None else 0))
            shape = (key.shape[0], key.shape[1], cap, key.shape[3])
            new_k, new_v = key.new_empty(shape), value.new_empty(shape)
            if buf_k is not None:
                new_k[:, :, :self.length] = buf_k[:, :, :self.length]
                new_v[:, :, :self.length] = self.v[layer][:, :, :self.length]
            self.k[layer], self.v[layer] = new_k, new_v
        self.k[layer][:, :, self.length:end] = key
        self.v[layer][:, :, self.length:end] = value
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self.k, self.v) for t in d.values())

    def free(self) -> None:
        self.k.clear()
        self.v.clear()


class StepLayout:
    """What attention needs for one flat forward: per sequence its KV and its token range [lo, hi)."""

    def __init__(self, caches: list[SequenceKV], bounds: list[tuple[int, int]]):
        self.caches, self.bounds = caches, bounds


def attention_configs(model) -> list:
    """Every config object `model`'s modules read their attention implementation from."""
    found = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
             if hasattr(c, "_attn_implementation_internal")}
    return list(found.values())


@contextlib.contextmanager
def running(configs: list, layout: StepLayout):
    """Within: attention under `configs` (attention_configs(model)) is this file's, reading `layout`
    (switched for the block only, so the same model still runs plain `generate` outside it)."""
    token = _STEP.set(layout)
    try:
        with switched(configs, NAME):
            yield
    finally:
        _STEP.reset(token)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
               **kwargs):
    """query (1, Hq, N, D), key/value (1, Hkv, N, D) -> ((1, N, Hq, D), None): each sequence's
    tokens attend to its cached K/V plus themselves, causally."""
    layout = _STEP.get()
    if layout is None or query.shape[0] != 1:
        raise LorakitError("the serving attention runs only inside a serving engine step")
    if sliding_window is not None or kwargs.get("softcap") is not None:
        raise LorakitError(f"{type(module).__name__} uses sliding-window or soft-capped attention, which the "
                           "serving engine does not implement yet")
    outs = []
    for cache, (lo, hi) in zip(layout.caches, layout.bounds):
        k, v = cache.write(module.layer_idx, key[:, :, lo:hi], value[:, :, lo:hi])
        t, total = hi - lo, k.shape[2]
        mask = None
        if t > 1 and total > t:  # a prompt chunk after earlier chunks: bottom-right causal
            mask = torch.ones(t, total, dtype=torch.bool, device=query.device).tril(total - t)[None, None]
        out, _ = sdpa_attention_forward(module, query[:, :, lo:hi], k, v, mask, dropout=0.0, scaling=scaling)
        outs.append(out)  # (1, t, Hq, D)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


AttentionInterface.register(NAME, _attention)
