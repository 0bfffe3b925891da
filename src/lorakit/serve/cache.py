"""The KV cache of the serving engine and the attention function that reads and writes it.

Each sequence owns, per layer, preallocated K and V buffers (1, kv_heads, capacity, head_dim) that
grow by doubling; attention reads the views [:, :, :length] (bitwise the same result as a
concatenated tensor, and no copy per token). A step is one flat row (1, N) of many sequences'
tokens; the attention function, registered with transformers' AttentionInterface under NAME, runs
once per sequence with the shapes and arguments a single `generate` call would use (a prefill from
position 0: is_causal, no mask; a decode: one query, no mask; both straight through torch's
scaled_dot_product_attention with the arguments transformers' sdpa_attention_forward would pass;
a prompt chunk after earlier chunks: a bottom-right causal mask, through sdpa_attention_forward).
So a sequence alone in a step gets the numbers `generate` gets. Sequences are not padded into one
batched call: padding changes the kernel's reduction order (results differ at ~1e-7), and a
sequence's numbers would then depend on what else is in the step. The prompt is never recomputed: each token's K/V is written
once, when it is first fed.

The step being run reaches the attention function through a context variable (`running(step)`),
set by the engine thread around its forward; nothing per call lives in a module global.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F
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
        """Store key/value (1, h, t, D) at [length, length + t); the views (1, h, length + t, D).
        (narrow, not [:, :, a:b]: Python indexing costs several times more, and this runs per sequence
        and layer every step.)"""
        start = self.length
        end = start + key.shape[2]
        buf_k, buf_v = self.k.get(layer), self.v.get(layer)
        if buf_k is None or buf_k.shape[2] < end:
            cap = max(16, end, 2 * (buf_k.shape[2] if buf_k is not None else 0))
            shape = (key.shape[0], key.shape[1], cap, key.shape[3])
            new_k, new_v = key.new_empty(shape), value.new_empty(shape)
            if buf_k is not None:
                new_k.narrow(2, 0, start).copy_(buf_k.narrow(2, 0, start))
                new_v.narrow(2, 0, start).copy_(buf_v.narrow(2, 0, start))
            self.k[layer], self.v[layer] = buf_k, buf_v = new_k, new_v
        buf_k.narrow(2, start, end - start).copy_(key)
        buf_v.narrow(2, start, end - start).copy_(value)
        return buf_k.narrow(2, 0, end), buf_v.narrow(2, 0, end)

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
    fast = _plain_sdpa(module, query, key, value)
    outs = []
    for cache, (lo, hi) in zip(layout.caches, layout.bounds):
        t = hi - lo
        k, v = cache.write(module.layer_idx, key.narrow(2, lo, t), value.narrow(2, lo, t))
        total = k.shape[2]
        q = query.narrow(2, lo, t)
        if fast is not None and (t == 1 or t == total):  # a decode, or a prefill from position 0
            outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=scaling,
                                                       is_causal=fast[0] and t > 1, **fast[1]))  # (1, Hq, t, D)
            continue
        mask = None
        if t > 1 and total > t:  # a prompt chunk after earlier chunks: bottom-right causal
            mask = torch.ones(t, total, dtype=torch.bool, device=query.device).tril(total - t)[None, None]
        out, _ = sdpa_attention_forward(module, q, k, v, mask, dropout=0.0, scaling=scaling)
        outs.append(out.transpose(1, 2))  # back to (1, Hq, t, D): one transpose for all below
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (1, Hq, N, D)
    return out.transpose(1, 2).contiguous(), None


def _plain_sdpa(module, query, key, value) -> tuple[bool, dict] | None:
    """(is_causal, extra sdpa kwargs) when transformers' sdpa_attention_forward, called without a mask
    as below, would only call torch's scaled_dot_product_attention with them (CPU or CUDA, head dim <=
    256: GQA by enable_gqa); the engine then calls torch directly, the same op with the same arguments
    (so the same numbers), without the wrapper's per-call Python. None otherwise (the wrapper runs)."""
    if query.device.type not in ("cpu", "cuda") or key.shape[-1] != value.shape[-1] or key.shape[-1] > 256:
        return None
    groups = getattr(module, "num_key_value_groups", 1)
    return bool(getattr(module, "is_causal", True)), ({"enable_gqa": True} if groups > 1 else {})


AttentionInterface.register(NAME, _attention)
