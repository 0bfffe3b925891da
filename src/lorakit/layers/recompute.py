"""Rebuilding a LoRA layer's input in backward instead of keeping it.

A's gradient needs the layer's input x (N, in), so a LoRA layer has to keep x until backward. The
frozen base often does not need x itself, only what x was computed from: RMSNorm keeps h and
rsqrt(mean(h²)+eps) for x = weight·(h·rsqrt), SwiGLU keeps silu(g) and u for x = silu(g)·u, a GELU
keeps its input h for x = gelu(h); a dtype cast (bf16 RMSNorm, autocast) keeps nothing and is
rebuilt from its rebuilt input. Keeping x as well costs one (N, in) tensor per adapted layer: on
SmolLM2 a fifth of a training step's peak memory. So when x comes straight out of such an op, the LoRA
layer keeps a reference to x's autograd node instead, and backward runs the op again on the tensors
the node kept: the same kernel on the same tensors, so bit-identical to the forward's x, for the
price of one elementwise pass over (N, in). Layers that read one x (q/k/v; gate/up) share one rebuild
(`Shared`): the first backward to need x rebuilds it, the last lets it go.

What a product's node keeps follows from the product rule: for y = a·b it keeps a if b requires grad
(d/db needs a) and b if a requires grad. A factor that is not kept requires grad itself, so it has a
node of its own, and when that node is one of these ops too, it is rebuilt the same way. `plan` checks
this from the graph's structure only (no saved tensor is unpacked in forward, which under gradient
checkpointing would start a recomputation); `replay` unpacks and recomputes.

`rebuilt_activations()` applies the same rule to everything autograd saves while it is active, the
base model's tensors included: SwiGLU's mul keeps silu(g) although the SiLU node keeps g, so the
trainer stores that as a recipe too and the step's activations shrink below the frozen base's own.
"""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F

_MAX_DEPTH = 4  # RMSNorm's weight·(h·rsqrt) needs 2, with its bf16 cast 3, cast again by autocast 4
# Activations whose node keeps its input (needed for its own derivative): op(input) is exactly x.
_ACTIVATIONS = {
    "GeluBackward0": lambda node: F.gelu(node._saved_self, approximate=node._saved_approximate),
    "SiluBackward0": lambda node: F.silu(node._saved_self),
}


def _cast_target(node):
    """(dtype, device) a ToCopyBackward0 node's forward produced, from its gradient metadata; None if
    this torch does not say."""
    meta = getattr(node, "_input_metadata", None)
    return (meta[0].dtype, meta[0].device) if meta and len(meta) == 1 else None


def _rebuildable(node, depth: int) -> bool:
    """Whether the output of autograd node `node` can be recomputed from what the graph keeps."""
    name = type(node).__name__ if node is not None and depth > 0 else None
    if name in _ACTIVATIONS:
        return True
    if name == "ToCopyBackward0":  # a dtype cast (bf16 models, autocast): keeps nothing, so rebuild its input
        return _cast_target(node) is not None and _rebuildable(node.next_functions[0][0], depth - 1)
    if name != "MulBackward0":
        return False
    (a_node, _), (b_node, _) = node.next_functions  # None where that factor needs no grad
    a_kept, b_kept = b_node is not None, a_node is not None  # the product rule, see the module doc
    return ((a_kept or _rebuildable(a_node, depth - 1))
            and (b_kept or _rebuildable(b_node, depth - 1)))


def plan(x: torch.Tensor):
    """x's autograd node if backward can rebuild x from tensors its graph keeps anyway, else None.

    None whenever x is not the direct output of such an op (a view, an in-place result, a leaf, no
    grad); under torch.compile, whose partitioner makes its own keep-or-recompute choices; and
    under saved-tensor hooks: gradient checkpointing keeps nothing anyway, and its saved tensors may
    be unpacked only once, by their own node."""
    if torch.compiler.is_compiling() or _saved_tensor_hooks_active():
        return None
    return x.grad_fn if _rebuildable(x.grad_fn, _MAX_DEPTH) else None


class Shared:
    """One rebuilt input for every LoRA layer that reads it: q/k/v share the attention's normed input,
    gate/up the MLP's. The first of their backwards replays the node, the others reuse that tensor,
    and the last drops it: on Llama 3 rebuilds per decoder layer instead of 6 (6 elementwise passes
    over (N, 576) fewer). x lives only while its readers' backwards run, which are adjacent in the graph."""
    __slots__ = ("node", "readers", "value")

    def __init__(self, node):
        self.node, self.readers, self.value = node, 0, None

    def take(self) -> torch.Tensor:
        x = self.value if self.value is not None else replay(self.node)
        self.readers -= 1
        self.value = x if self.readers > 0 else None  # a second backward (retain_graph) replays again
        return x

    def peek(self) -> torch.Tensor:
        """The value for a read nobody counted (a replay unpacking its node's factors): rebuilt and kept
        for the reader that was counted. SwiGLU's silu(g) is read so by down's input rebuild, just
        before the mul's own backward reads it."""
        if self.value is None:
            self.value = replay(self.node)
        return self.value


def shared_plan(x: torch.Tensor) -> Shared | None:
    """`plan(x)` as a Shared rebuild that every LoRA layer reading this same tensor x joins; None when
    x must be kept."""
    node = plan(x)
    return None if node is None else _join(x, node)


def _join(x: torch.Tensor, node) -> Shared:
    """x's Shared rebuild from `node`, with one more reader. Kept on x itself: x is one Python object
    for all its readers in a forward (q/k/v get the same hidden-states tensor)."""
    entry = x.__dict__.get("_lorakit_rebuild")
    if entry is None or entry.node is not node:
        entry = x._lorakit_rebuild = Shared(node)
    entry.readers += 1
    return entry


def replay(node) -> torch.Tensor:
    """The output of node `node` (from plan), recomputed from the tensors autograd kept."""
    rebuild = _ACTIVATIONS.get(type(node).__name__)
    if rebuild is not None:
        return rebuild(node)
    if type(node).__name__ == "ToCopyBackward0":
        dtype, device = _cast_target(node)
        return replay(node.next_functions[0][0]).to(dtype=dtype, device=device)
    with _peeking():  # these reads are not the node's own: see Shared.peek
        kept = (node._saved_self, node._saved_other)
    return torch.mul(*(k if k is not None else replay(child) for k, (child, _) in zip(kept, node.next_functions)))


_REPLAYING = threading.local()  # .depth > 0 while replay reads a node's saved factors (see Shared.peek)


@contextlib.contextmanager
def _peeking():
    _REPLAYING.depth = getattr(_REPLAYING, "depth", 0) + 1
    try:
        yield
    finally:
        _REPLAYING.depth -= 1


def _saved_tensor_hooks_active() -> bool:
    """Whether torch.autograd.graph.saved_tensors_hooks (checkpointing, offloading) is in force; True
    where this torch cannot tell, so that x is then simply kept."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


class _Recipe:
    """What a saved tensor is stored as when it can be rebuilt: the Shared rebuild of the tensor, or of
    the tensor it is a view of, plus the view's (shape, stride, offset) (a linear's flattened input)."""
    __slots__ = ("shared", "view")

    def __init__(self, shared: Shared, view=None):
        self.shared, self.view = shared, view


def _pack(t: torch.Tensor):
    base = t if t._base is None else t._base  # a view is rebuilt from its base, then viewed again
    if base is not t and not base.is_contiguous():
        return t
    if base.grad_fn is None or not _rebuildable(base.grad_fn, _MAX_DEPTH):
        return t
    view = None if base is t else (t.shape, t.stride(), t.storage_offset() - base.storage_offset())
    return _Recipe(_join(base, base.grad_fn), view)


def _unpack(packed):
    if not isinstance(packed, _Recipe):
        return packed
    x = packed.shared.peek() if getattr(_REPLAYING, "depth", 0) else packed.shared.take()
    if packed.view is None:
        return x
    shape, stride, offset = packed.view
    x = x.contiguous()  # the layout the view's geometry refers to (checked contiguous in _pack)
    return x.as_strided(shape, stride, x.storage_offset() + offset)


def rebuilt_activations() -> torch.autograd.graph.saved_tensors_hooks:
    """Context for a training forward: every tensor autograd saves that backward can rebuild from
    tensors kept anyway (see the module doc) is stored as a reference to its node and recomputed when
    backward unpacks it. Values and gradients are unchanged (the same kernels on the same tensors).
    Not for torch.compile'd code (its partitioner decides itself); inside gradient-checkpointed
    layers checkpointing's own hooks take over."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)
