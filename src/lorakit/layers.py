"""The LoRA layer: h = base(x) + s · B(A(dropout(x))), with merge and unmerge.

One class wraps any supported base layer without changing it (composition): nn.Linear, GPT-2's
Conv1D (weight stored (in, out), "fan_in_fan_out") and nn.Embedding; quantized bases come through
quant.py. Per adapter name it holds A (r, in), B (out, r), the scaling s and a dropout; DoRA adds a
magnitude vector m (out,) and its math lives in variants.py.

Numerics follow PEFT (same formulas, same init RNG consumption), so with equal weights the outputs
agree to float rounding. For speed the low-rank term is accumulated into the base output by one GEMM
(addmm, in place outside autograd) instead of PEFT's separate product, scale and add; see
_apply_adapter. For nn.Embedding PEFT's convention holds: A (r, num_embeddings) is the
zero-initialised factor and B (dim, r) the random one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import quant, recompute, variants
from .errors import LorakitError

SUPPORTED = "nn.Linear, transformers' Conv1D, nn.Embedding, bitsandbytes Linear4bit/Linear8bitLt"


def layer_kind(module: nn.Module) -> str | None:
    """'linear' | 'conv1d' | 'embedding' for a wrappable module, else None."""
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    if isinstance(module, nn.Linear):  # includes bitsandbytes' Linear4bit / Linear8bitLt
        return "linear"
    return None


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base weight as a dense tensor in its stored layout (dequantized if quantized)."""
    if hasattr(base.weight, "quant_state") or hasattr(base.weight, "SCB") or type(base).__name__ == "Linear8bitLt":
        from .quant import dequantize_weight
        return dequantize_weight(base)
    return base.weight


class LoraLayer(nn.Module):
    """A frozen base layer plus any number of named low-rank adapters."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise LorakitError(f"cannot add LoRA to {type(base_layer).__name__}; supported: {SUPPORTED}")
        quant.prepare_quantized_base(base_layer)  # 4-bit: keep bitsandbytes' trainable layout (see quant.py)
        self.base_layer = base_layer
        self.kind = kind
        if kind == "embedding":
            self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        elif kind == "conv1d":
            self.in_features, self.out_features = base_layer.weight.shape  # Conv1D stores (in, out)
        else:
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA: name -> (out,)
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._dora_cache: dict[str, tuple] = {}
        self._stack_cache: dict[str, tuple] = {}  # routing.py: all adapters stacked for mixed batches
        self._merge_factor: dict[str, torch.Tensor] = {}  # DoRA: m/||W+ΔW|| used at merge, for unmerge

    # -- adapters ------------------------------------------------------------------------------------

    def add(self, name: str, r: int, scaling: float, dropout: float = 0.0, init: bool | str = True,
            dora: bool = False, upcast: bool = True) -> None:
        """Create adapter `name`. RNG use mirrors PEFT so the same seed gives the same weights.

        upcast: on a bf16/fp16 base, keep the adapter in fp32 (PEFT's autocast_adapter_dtype=True);
        like PEFT, the values pass through the base dtype first, so both round identically.
        """
        if dora and self.kind == "embedding":
            raise LorakitError("DoRA on nn.Embedding is not supported by lorakit; leave the embedding out of "
                               "target_modules or set use_dora=False")
        dev, dtype = self._param_device_dtype()
        A, B = torch.empty(r, self.in_features), torch.empty(self.out_features, r)
        if self.kind == "embedding":  # PEFT: randn, then zeros(A) / normal(B)
            A.normal_(), B.normal_()
        else:  # PEFT: nn.Linear(in, r) and nn.Linear(r, out) draw their default init first
            nn.init.kaiming_uniform_(A, a=math.sqrt(5)), nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        self.lora_A[name], self.lora_B[name] = nn.Parameter(A), nn.Parameter(B)
        self._stack_cache.clear()
        self.r[name], self.scaling[name] = r, scaling
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if isinstance(init, str) and init.startswith("pissa"):
            self._pissa_init(name, init)
        elif init is not False:
            self._reset(name, init)
        self.lora_A[name].data = self.lora_A[name].data.to(dev, dtype)
        self.lora_B[name].data = self.lora_B[name].data.to(dev, dtype)
        if dora:  # m = ||W + s·BA|| per row, computed like PEFT: directly, in the base dtype, before upcasting
            W = self.dense_weight().to(dtype)  # a quantized base dequantizes to its compute dtype
            A_, B_ = self.lora_A[name].detach(), self.lora_B[name].detach()
            m = torch.linalg.norm(W + scaling * (B_.to(W.dtype) @ A_.to(W.dtype)), dim=1)
            self.lora_magnitude_vector[name] = nn.Parameter(m.to(dtype))
        if upcast and dtype in (torch.float16, torch.bfloat16):
            for store in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
                if name in store:
                    store[name].data = store[name].data.float()

    def _reset(self, name: str, init: bool | str) -> None:
        A, B = self.lora_A[name], self.lora_B[name]
        if self.kind == "embedding":
            nn.init.zeros_(A), nn.init.normal_(B)
        elif init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5)), nn.init.zeros_(B)
        else:  # "gaussian": std 1/r, as PEFT
            nn.init.normal_(A, std=1 / self.r[name]), nn.init.zeros_(B)

    @torch.no_grad()
    def _pissa_init(self, name: str, init: str) -> None:
        """PiSSA: A, B from the top-r singular triplets of W; the base keeps the residual W - s·BA."""
        if self.kind == "embedding":
            raise LorakitError("init_lora_weights='pissa' is supported for linear layers only")
        W = self.dense_weight().float()  # (out, in)
        r, s = self.r[name], self.scaling[name]
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            U, S, Vh = U[:, :r], S[:r], Vh[:r]
        else:
            U, S, V = torch.svd_lowrank(W, q=r, niter=int(init.rsplit("_", 1)[1]))
            Vh = V.T
        S = S / s
        self.lora_A[name].data = (torch.diag(S.sqrt()) @ Vh).contiguous()
        self.lora_B[name].data = (U @ torch.diag(S.sqrt())).contiguous()
        residual = W - s * self.lora_B[name] @ self.lora_A[name]
        self._set_dense_weight(residual)

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LorakitError(f"adapter {name!r} is merged; unmerge it before deleting")
        for store in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.lora_dropout):
            if name in store:  # ParameterDict.pop takes no default
                del store[name]
        for store in (self.r, self.scaling, self._dora_cache, self._merge_factor):
            store.pop(name, None)
        self._stack_cache.clear()
        self.active_adapters = [a for a in self.active_adapters if a != name]

    # -- the math --------------------------------------------------------------------------------------

    def dense_weight(self) -> torch.Tensor:
        """W0 as (out, in) for linear/conv1d, (num_embeddings, dim) for embedding."""
        W = base_weight(self.base_layer)
        return W.T if self.kind == "conv1d" else W

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A in the layout of dense_weight(); computed in fp32 on CPU for half-precision adapters."""
        A, B = self.lora_A[name], self.lora_B[name]
        low_cpu = A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16)
        if low_cpu:
            A, B = A.float(), B.float()
        delta = B @ A * self.scaling[name]  # (out, in)
        if self.kind == "embedding":
            delta = delta.T  # (num_embeddings, dim)
        return delta.to(self.lora_A[name].dtype) if low_cpu else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is not None:  # training fast path: base and adapter in one autograd node
            A, B, b = self.lora_A[name], self.lora_B[name], self.base_layer.bias
            return _LoraLinear.apply(x, self.base_layer.weight, b, A, B, self.scaling[name])
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        rows = _current_rows()
        if rows is not None:
            from .routing import mixed_forward
            return mixed_forward(self, x, result, rows)
        out_dtype = result.dtype
        quantized = quant.is_quantized(self.base_layer)
        # May the adapters write into `result` in place? Only if nothing else can hold it: a plain
        # nn.Linear without forward hooks returns a fresh tensor, and only outside autograd (in-place
        # ops on a view of a graph tensor would cost a copy in backward).
        owned = (not torch.is_grad_enabled() and type(self.base_layer) is nn.Linear
                 and not self.base_layer._forward_hooks and not nn.modules.module._global_forward_hooks)
        for name in self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            # PEFT's bnb layers add fp32 adapter outputs in the base's dtype: cast_to for quantized bases
            result, owned = self._apply_adapter(name, x, result, owned, cast_to=out_dtype if quantized else None)
        return result.to(out_dtype)

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The adapter to run through _LoraLinear, or None for the general path.

        Only the plain training case: grad on, a plain nn.Linear with a frozen weight and no hooks, one
        active unmerged adapter without DoRA or dropout, one dtype throughout, no autocast, no
        per-row routing. Everything else (inference, quantized or hooked bases, several adapters,
        mixed precision) takes the general path, which gives the same values.
        """
        if not torch.is_grad_enabled() or self.disabled or args or kwargs or self.kind != "linear":
            return None
        base = self.base_layer
        if (type(base) is not nn.Linear or base.weight.requires_grad or base._forward_hooks
                or base._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or torch.is_autocast_enabled(x.device.type) or _current_rows() is not None):
            return None
        live = [n for n in self.active_adapters if n not in self.merged_adapters and n in self.lora_A]
        if len(live) != 1 or live[0] in self.lora_magnitude_vector:
            return None
        name = live[0]
        if not isinstance(self.lora_dropout[name], nn.Identity):
            return None
        return name if x.dtype == base.weight.dtype == self.lora_A[name].dtype == self.lora_B[name].dtype else None

    def _apply_adapter(self, name: str, x: torch.Tensor, result: torch.Tensor, owned: bool,
                       cast_to: torch.dtype | None = None) -> tuple[torch.Tensor, bool]:
        """result + what adapter `name` adds for input x; (new result, whether we own it).

        Same value as PEFT's `result + B(A(dropout(x))) * s`, computed as one GEMM that accumulates into
        the base output, result + s·(x·Aᵀ)·Bᵀ (addmm with alpha=s): no (tokens, out) temporaries for
        B·A·x and s·B·A·x, and no (tokens, out) multiply by s in backward. In place when `owned`.
        """
        A, B, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        if self.kind == "embedding":
            after_A = self._embed(x, A.T)  # (..., r)
            return result + (after_A @ B.T) * s, True
        x = x.to(A.dtype)
        dropout = self.lora_dropout[name]
        if name in self.lora_magnitude_vector:
            return variants.dora_apply(self, name, x, result, dropout, owned)
        after_A = F.linear(dropout(x), A)  # (..., r)
        if not (result.dtype == after_A.dtype == B.dtype and result.is_contiguous()):  # fp32 adapters, bf16 base
            delta = F.linear(after_A, B) * s
            return result + (delta.to(cast_to) if cast_to is not None else delta), True
        out2d, h2d = result.view(-1, self.out_features), after_A.reshape(-1, after_A.shape[-1])  # (N, out), (N, r)
        if owned:
            out2d.addmm_(h2d, B.T, alpha=s)
            return result, True
        return torch.addmm(out2d, h2d, B.T, alpha=s).view(result.shape), True

    def _embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        b = self.base_layer
        return F.embedding(ids, weight, padding_idx=b.padding_idx, max_norm=b.max_norm,
                           norm_type=b.norm_type, scale_grad_by_freq=b.scale_grad_by_freq, sparse=b.sparse)

    # -- merge -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        """Fold adapters into the base weight: W <- W + s·BA (DoRA: W <- m/||W+s·BA|| · (W+s·BA))."""
        for name in names if names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.lora_A:
                continue
            W = self.dense_weight()
            if name in self.lora_magnitude_vector:
                new_W, factor = variants.dora_merged_weight(self, name, W)
                self._merge_factor[name] = factor
            else:
                new_W = W + self.delta_weight(name).to(W.dtype)
            if safe and not torch.isfinite(new_W).all():
                raise LorakitError(f"merging adapter {name!r} would put NaN/Inf into {self._label()}; "
                                   "the adapter weights are broken (check training for divergence)")
            self._set_dense_weight(new_W)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merges in reverse order; restores W0 up to float rounding."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            W = self.dense_weight()
            if name in self._merge_factor:
                W = W / self._merge_factor.pop(name).view(-1, 1) - self.delta_weight(name).to(W.dtype)
            else:
                W = W - self.delta_weight(name).to(W.dtype)
            self._set_dense_weight(W)

    def _set_dense_weight(self, W: torch.Tensor) -> None:
        self._dora_cache.clear()
        if quant.is_quantized(self.base_layer):
            quant.requantize_weight(self.base_layer, W)
            return
        target = self.base_layer.weight
        target.data.copy_(W.T if self.kind == "conv1d" else W)

    def _param_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        W = self.base_layer.weight
        fp_base = W.dtype.is_floating_point and not quant.is_quantized(self.base_layer)
        dtype = W.dtype if fp_base else torch.float32  # quantized bases (any quant_storage): fp32 adapters
        return W.device, dtype

    def _label(self) -> str:
        return f"{type(self.base_layer).__name__}({self.in_features}->{self.out_features})"

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.r[n]}, s={self.scaling[n]:g}" for n in self.lora_A)
        return f"kind={self.kind}, adapters=[{adapters}], active={self.active_adapters}"


class _LoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ for a frozen W, with a hand-written backward.

    Autograd would build four nodes per layer (base linear, A, B, add) and sum the base's and the
    adapter's input gradients with a separate (N, in) add. Here backward computes
        gB = g·B (N, r);  grad_x = g·W + s·gB·A;  grad_A = s·gBᵀ·x;  grad_B = s·gᵀ·(x·Aᵀ)
    with the adapter's part of grad_x accumulated into the base's by one addmm. Saved: x·Aᵀ (N, r)
    and x, unless A is frozen (LoRA-FA) or x is a product whose factors the base keeps anyway
    (RMSNorm, SwiGLU), which backward multiplies again, once for all the layers that read that x
    (recompute.py); no (N, out) tensor is kept.
    (Folding s·B·A into a temporary weight when tokens outnumber its columns was tried and dropped:
    no gain we could measure over the step, see docs/benchmarks.md.)
    """

    @staticmethod
    def forward(ctx, x, W, bias, A, B, s: float):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xa = x2 @ A.T  # (N, r)
        y = torch.addmm(bias, x2, W.T) if bias is not None else x2 @ W.T  # (N, out)
        y.addmm_(xa, B.T, alpha=s)
        ctx.s = s
        # x is needed for A's gradient only; rebuilt in backward when the base keeps its factors
        ctx.x_rebuild = recompute.shared_plan(x) if ctx.needs_input_grad[3] else None
        keep_x = ctx.needs_input_grad[3] and ctx.x_rebuild is None
        ctx.save_for_backward(x if keep_x else None, xa, W, A, B)
        return y.view(*x.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, g):
        x, xa, W, A, B = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gB = g2 @ B  # (N, r)
        grad_x = (g2 @ W).addmm_(gB, A, alpha=s).view(*g.shape[:-1], W.shape[1]) if need[0] else None
        grad_bias = g2.sum(0) if need[2] else None
        if need[3] and ctx.x_rebuild is not None:
            x = ctx.x_rebuild.take()
        grad_A = (gB.T @ x.reshape(-1, x.shape[-1])).mul_(s) if need[3] else None  # (r, in)
        grad_B = (g2.T @ xa).mul_(s) if need[4] else None  # (out, r)
        return grad_x, None, grad_bias, grad_A, grad_B, None


# Per-row adapter routing for mixed batches is set by routing.py for the duration of one forward.
_ROWS: list = [None]


def _current_rows():
    return _ROWS[0]
