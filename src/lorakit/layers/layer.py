"""The LoRA layer: h = base(x) + s · B(A(dropout(x))); merge and unmerge in merging.py.

One class wraps any base layer that has a registered base kind (bases.py: nn.Linear, GPT-2's Conv1D,
nn.Embedding, nn.Conv1d/2d/3d, nn.MultiheadAttention (mha.py); bnb.py: bitsandbytes 4/8-bit) without
changing it (composition). Per adapter name it
holds A (r, in), B (out, r), the scaling s and a dropout; an adapter may carry a variant object
(variant.py; dora.py and the others) that the layer calls for its output and its merge, and that owns its own caches. The layer
does not choose kinds or variants: adapters/ does, above it.

A batch whose rows use different adapters (mixed.py) hands the layer its per-call plan through a
context variable (`using_row_plan`): each thread, and each asyncio task, sees only its own plan.

Numerics follow PEFT (same formulas, same init RNG consumption), so with equal weights the outputs
agree to float rounding. For speed the low-rank term is accumulated into the base output by one GEMM
(addmm, in place outside autograd) instead of PEFT's separate product, scale and add; see
_apply_adapter; training with one plain adapter goes through one autograd node per layer (fused.py).
For nn.Embedding PEFT's convention holds: A (r, num_embeddings) is the zero-initialised factor and
B (dim, r) the random one. For convolutions (family "conv") too: A is a conv with the base's kernel,
stride and padding, (r, in, *k), and B a 1x1 conv with the base's groups, (out, r/groups, 1, ...).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LorakitError, UnsupportedError
from . import bases, merging, mha, param, pissa
from .fused import lora_linear
from .variant import Variant

# The row plan of the mixed-adapter forward running in this context (mixed.RowPlan), or None.
_ROW_PLAN: contextvars.ContextVar = contextvars.ContextVar("lorakit_row_plan", default=None)


@contextlib.contextmanager
def using_row_plan(plan):
    """Within this block (this thread / task only), every LoraLayer forward adds its adapters' output
    as `plan.apply(layer, x, result)` decides, row by row."""
    token = _ROW_PLAN.set(plan)
    try:
        yield plan
    finally:
        _ROW_PLAN.reset(token)


def current_row_plan():
    return _ROW_PLAN.get()


class LoraLayer(nn.Module):
    """A frozen base layer plus any number of named low-rank adapters."""

    def __init__(self, base_layer: nn.Module, kind: bases.BaseKind | None = None):
        """kind: how to read base_layer's weight; None asks the registry (a ParamKind adapts one parameter)."""
        super().__init__()
        kind = kind if kind is not None else bases.kind_of(base_layer)
        if kind is None:
            raise LorakitError(f"cannot add LoRA to {type(base_layer).__name__}; supported: {bases.supported()}")
        kind.prepare(base_layer)
        self.base_layer = base_layer
        self.base_kind = kind
        self.kind = kind.family  # "linear" | "conv1d" | "embedding" | "conv": the adapters' shape convention
        self.in_features, self.out_features = kind.features(base_layer)
        self.lora_A = nn.ParameterDict()  # name -> (r, in)
        self.lora_B = nn.ParameterDict()  # name -> (out, r)
        self.lora_magnitude_vector = nn.ParameterDict()  # a variant's per-row vector (DoRA: name -> (out,))
        self.lora_diag = nn.ParameterDict()  # KaSA's learnable diagonal between A and B: name -> (r,)
        self.lora_bias = nn.ParameterDict()  # name -> (out,): B's bias, PEFT's lora_bias=True (saved as lora_B.bias)
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, Variant] = {}  # adapters that are not plain LoRA
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.generation = 0  # counts additions and deletions of adapters (what a router's stacks key on)
        if self.kind == "mha":  # its out_proj's adapters live in a LoraLayer of their own (mha.py)
            base_layer.out_proj = LoraLayer(base_layer.out_proj)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as PEFT's wrapped layers expose it; merges change it in place)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    # -- adapters ------------------------------------------------------------------------------------

    def add(self, name: str, r: int, scaling: float, dropout: float = 0.0, init: bool | str = True,
            variant: Variant | None = None, upcast: bool = True, bias: bool = False, meta: bool = False,
            device: torch.device | None = None) -> None:
        """Create adapter `name`. RNG use mirrors PEFT so the same seed gives the same weights.

        device: where the adapter lives; default the base weight's device. A base whose weight is
        offloaded (on the meta device, brought in at call time by a wrapper) needs its compute device.

        upcast: on a bf16/fp16 base, keep the adapter in fp32 (PEFT's autocast_adapter_dtype=True);
        like PEFT, the values pass through the base dtype first, so both round identically.
        bias: B gets a bias (PEFT's lora_bias), drawn like nn.Linear's after B's weight, zero on init.
        meta: PEFT's low_cpu_mem_usage: the adapter's tensors are empty, on the meta device (no memory, no
        RNG, no init), to be assigned by loading a state dict (peft_compat.set_peft_model_state_dict).
        """
        if variant is not None:
            variant.check(self)
        if self.kind == "param":
            param.check(dropout, variant, bias)
        if self.kind == "mha":  # in_proj's adapter and out_proj's, in PEFT's order
            mha.check(self, variant, bias)
            return mha.add(self, name, lambda: self._add(name, r, scaling, dropout, init, None, upcast, False, meta,
                                                         device),
                           r=r, scaling=scaling, dropout=dropout, init=init, upcast=upcast, meta=meta)
        self._add(name, r, scaling, dropout, init, variant, upcast, bias, meta, device)

    def _add(self, name: str, r: int, scaling: float, dropout: float, init: bool | str, variant: Variant | None,
             upcast: bool, bias: bool, meta: bool, device: torch.device | None) -> None:
        if bias and (self.kind == "embedding" or (variant is not None and not variant.lora_bias)):
            raise LorakitError(f"lora_bias=True is not supported for {self._label()}"
                               f"{' with DoRA' if variant is not None else ''}; set lora_bias=False")
        dev, dtype = self._param_device_dtype()
        if meta:
            dev, init = torch.device("meta"), False
        else:
            dev = torch.device(device) if device is not None else dev
            if dev.type == "meta":
                raise LorakitError(f"{self._label()}: its weight is on the meta device (offloaded), so the adapter "
                                   "needs a compute device; pass device= (add_adapter finds accelerate's)")
        A, B = self._factor_shapes(r, "meta" if meta else None)
        if meta:
            pass  # nothing drawn: the values come from a state dict
        elif self.kind == "embedding":  # PEFT: randn, then zeros(A) / normal(B)
            A.normal_(), B.normal_()
        else:  # PEFT: nn.Linear(in, r) and nn.Linear(r, out) draw their default init first
            nn.init.kaiming_uniform_(A, a=math.sqrt(5)), nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        if bias:  # nn.Linear / nn.ConvNd draw the bias after the weight: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(B[0].numel())
            b = torch.empty(self.out_features, device=A.device)
            self.lora_bias[name] = nn.Parameter(b if meta else b.uniform_(-bound, bound))
        self.lora_A[name], self.lora_B[name] = nn.Parameter(A), nn.Parameter(B)
        self.r[name], self.scaling[name] = r, scaling
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.generation += 1
        if isinstance(init, str) and init.startswith("pissa"):
            if self._offloaded():
                raise LorakitError(f"{self._label()}: PiSSA init needs the base weight, which is offloaded (meta); "
                                   "load the model without disk offload (model_kwargs.device_map) or use init=True")
            pissa.init(self, name, init)
        elif init is not False:
            self._reset(name, init)
        self.lora_A[name].data = self.lora_A[name].data.to(dev, dtype)
        self.lora_B[name].data = self.lora_B[name].data.to(dev, dtype)
        if bias:
            self.lora_bias[name].data = self.lora_bias[name].data.to(dev, dtype)
        if variant is not None:
            self.variants[name] = variant
            variant.added(self, name)
        if upcast and dtype in (torch.float16, torch.bfloat16):
            for store in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.lora_bias, self.lora_diag):
                if name in store:
                    store[name].data = store[name].data.float()
            if variant is not None:
                variant.upcast(self, name)

    def add_frozen(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
        """Create plain adapter `name` from given factors A (r, in), B (out, r), frozen, drawing no random
        init (a server attaching adapters it has read); dtypes as add() gives them (fp32 on a half base)."""
        dev, dtype = self._param_device_dtype()
        dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        self.lora_A[name] = nn.Parameter(A.to(dev, dtype, copy=True), requires_grad=False)
        self.lora_B[name] = nn.Parameter(B.to(dev, dtype, copy=True), requires_grad=False)
        self.r[name], self.scaling[name] = A.shape[0], scaling
        self.lora_dropout[name] = nn.Identity()
        self.generation += 1

    def _factor_shapes(self, r: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty A and B in this layer's convention (see the module docstring)."""
        if self.kind != "conv":
            return torch.empty(r, self.in_features, device=device), torch.empty(self.out_features, r, device=device)
        base = self.base_layer
        if r % base.groups:
            raise LorakitError(f"{self._label()} has groups={base.groups}, which must divide r={r}; choose r as a "
                               "multiple of the groups or leave this layer out of target_modules")
        ones = (1,) * len(base.kernel_size)
        return (torch.empty(r, self.in_features, *base.kernel_size, device=device),
                torch.empty(self.out_features, r // base.groups, *ones, device=device))

    def _reset(self, name: str, init: bool | str) -> None:
        A, B = self.lora_A[name], self.lora_B[name]
        if name in self.lora_bias:
            nn.init.zeros_(self.lora_bias[name])
        if self.kind == "embedding":
            nn.init.zeros_(A), nn.init.normal_(B)
        elif init is True:
            nn.init.kaiming_uniform_(A, a=math.sqrt(5)), nn.init.zeros_(B)
        else:  # "gaussian": std 1/r, as PEFT
            nn.init.normal_(A, std=1 / self.r[name]), nn.init.zeros_(B)

    def delete(self, name: str) -> None:
        if name in self.merged_adapters:
            raise LorakitError(f"adapter {name!r} is merged; unmerge it before deleting")
        for store in (self.lora_A, self.lora_B, self.lora_magnitude_vector, self.lora_bias, self.lora_dropout,
                      self.lora_diag):
            if name in store:  # ParameterDict.pop takes no default
                del store[name]
        for store in (self.r, self.scaling):
            store.pop(name, None)
        if name in self.variants:
            self.variants.pop(name).deleted(self, name)
        self.generation += 1
        self.active_adapters = [a for a in self.active_adapters if a != name]
        if self.kind == "mha":
            self.base_layer.out_proj.delete(name)

    def replace_base(self, base_layer: nn.Module) -> None:
        """Put another base layer of the same shape under the adapters (e.g. a dequantized copy)."""
        kind = bases.kind_of(base_layer)
        if kind is None or kind.features(base_layer) != (self.in_features, self.out_features):
            raise LorakitError(f"replace_base: {type(base_layer).__name__} does not fit {self._label()}")
        kind.prepare(base_layer)
        self.base_layer, self.base_kind = base_layer, kind
        for variant in self.variants.values():
            variant.reset()

    # -- the math --------------------------------------------------------------------------------------

    def dense_weight(self) -> torch.Tensor:
        """W0 as (out, in) for linear/conv1d, (num_embeddings, dim) for embedding."""
        return self.base_kind.weight(self.base_layer)

    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A in the layout of dense_weight(); computed in fp32 on CPU for half-precision adapters."""
        A, B = self.factors(name)
        low_cpu = A.device.type == "cpu" and A.dtype in (torch.float16, torch.bfloat16)
        if low_cpu:
            A, B = A.float(), B.float()
        if name in self.lora_diag:  # KaSA: s·(B·diag(d))·A
            B = B * self.lora_diag[name].to(B.dtype)
        if self.kind == "conv":
            delta = self.base_kind.lora_delta(self.base_layer, A, B, self._label()) * self.scaling[name]
        else:
            delta = B @ A * self.scaling[name]  # (out, in)
        if self.kind == "embedding":
            delta = delta.T  # (num_embeddings, dim)
        return delta.to(self.lora_A[name].dtype) if low_cpu else delta

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter `name`'s A (r, in) and B (out, r) as dense matrices (what ΔW = s·B·A is made of)."""
        variant = self.variants.get(name)
        return variant.factors(self, name) if variant else (self.lora_A[name], self.lora_B[name])

    def live_adapters(self) -> list[str]:
        """The active adapters that run in forward: present in this layer and not merged."""
        return [n for n in self.active_adapters if n not in self.merged_adapters and n in self.lora_A]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.kind == "mha":
            if _ROW_PLAN.get() is not None:
                raise UnsupportedError("lora.MultiheadAttention does not support mixed adapter batches (as in PEFT): "
                                   f"{self._label()} is adapted; run one adapter per batch")
            return mha.forward(self, x, *args, **kwargs)
        if self.kind == "param":
            if _ROW_PLAN.get() is not None:
                raise LorakitError(f"mixed adapter batches are not supported for LoRA on a parameter "
                                   f"(target_parameters, {self._label()}), as in PEFT; run one adapter per batch")
            return param.forward(self, x, *args, **kwargs)
        name = self._fused_adapter(x, args, kwargs)
        if name is not None:  # training fast path: base and adapter in one autograd node
            A, B, b = self.lora_A[name], self.lora_B[name], self.base_layer.bias
            return lora_linear(x, self.base_layer.weight, b, A, B, self.scaling[name])
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        plan = _ROW_PLAN.get()
        if plan is not None:
            return plan.apply(self, x, result)
        out_dtype = result.dtype
        # PEFT's bnb layers add fp32 adapter outputs in the base's dtype (bases.py: cast_delta)
        cast_to = out_dtype if self.base_kind.cast_delta else None
        # May the adapters write into `result` in place? Only if nothing else can hold it: a plain
        # nn.Linear without forward hooks returns a fresh tensor, and only outside autograd (in-place
        # ops on a view of a graph tensor would cost a copy in backward).
        owned = (not torch.is_grad_enabled() and type(self.base_layer) is nn.Linear
                 and not self.base_layer._forward_hooks and not nn.modules.module._global_forward_hooks)
        for name in self.live_adapters():
            result, owned = self._apply_adapter(name, x, result, owned, cast_to)
        return result.to(out_dtype)

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The adapter to run through fused.lora_linear, or None for the general path.

        Only the plain training case: grad on, a plain nn.Linear with a frozen weight in memory and no
        hooks or instance-level forward (accelerate's offload wrapper brings the weight in at call time), one
        active unmerged plain adapter without dropout, one dtype throughout, no autocast, no per-row
        plan. Everything else (inference, quantized or hooked bases, several adapters, variants,
        mixed precision) takes the general path, which gives the same values.
        """
        if not torch.is_grad_enabled() or self.disabled or args or kwargs or self.kind != "linear":
            return None
        base = self.base_layer
        if (type(base) is not nn.Linear or base.weight.requires_grad or base.weight.is_meta
                or "forward" in vars(base) or base._forward_hooks
                or base._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or torch.is_autocast_enabled(x.device.type) or _ROW_PLAN.get() is not None):
            return None
        live = self.live_adapters()
        if len(live) != 1 or live[0] in self.variants or live[0] in self.lora_bias:
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
        if A.is_meta or B.is_meta:
            raise LorakitError(f"adapter {name!r} of {self._label()} is still empty (created with "
                               "low_cpu_mem_usage=True); load its weights first (set_peft_model_state_dict)")
        if self.kind == "embedding":
            if name in self.variants:  # ids stay ids: no dtype cast, no dropout (as PEFT)
                return self.variants[name].apply(self, name, x, result, nn.Identity(), owned)
            after_A = self.embed(x, A.T)  # (..., r)
            return result + (after_A @ B.T) * s, True
        x = x.to(A.dtype)
        dropout = self.lora_dropout[name]
        if name in self.variants:
            return self.variants[name].apply(self, name, x, result, dropout, owned)
        if self.kind == "conv":  # PEFT: lora_B(lora_A(dropout(x))) * s, A and B convolutions
            base, conv = self.base_layer, self.base_kind.conv_fn
            after_A = conv(dropout(x), A, None, base.stride, base.padding)  # (N, r, *spatial)
            delta = conv(after_A, B, self.lora_bias.get(name), 1, 0, 1, base.groups) * s  # (N, out, *spatial)
            return result + (delta.to(cast_to) if cast_to is not None else delta), True
        after_A = F.linear(dropout(x), A)  # (..., r)
        if name in self.lora_bias or not (result.dtype == after_A.dtype == B.dtype and result.is_contiguous()):
            delta = F.linear(after_A, B, self.lora_bias.get(name)) * s  # fp32 adapters on a bf16 base, or a bias
            return result + (delta.to(cast_to) if cast_to is not None else delta), True
        out2d, h2d = result.view(-1, self.out_features), after_A.reshape(-1, after_A.shape[-1])  # (N, out), (N, r)
        if owned:
            out2d.addmm_(h2d, B.T, alpha=s)
            return result, True
        return torch.addmm(out2d, h2d, B.T, alpha=s).view(result.shape), True

    def embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """F.embedding of `ids` in `weight` with the base embedding's options (padding_idx, max_norm, ...)."""
        b = self.base_layer
        return F.embedding(ids, weight, padding_idx=b.padding_idx, max_norm=b.max_norm,
                           norm_type=b.norm_type, scale_grad_by_freq=b.scale_grad_by_freq, sparse=b.sparse)

    # -- merge -----------------------------------------------------------------------------------------

    def merge(self, names: list[str] | None = None, safe: bool = False) -> None:
        """Fold adapters into the base weight: W <- W + s·BA (merging.py; a variant computes its own)."""
        merging.merge(self, names, safe)

    def unmerge(self) -> None:
        """Undo merges in reverse order; restores W0 up to float rounding (merging.py)."""
        merging.unmerge(self)

    def _set_dense_weight(self, W: torch.Tensor) -> None:
        self.base_kind.set_weight(self.base_layer, W)
        for variant in self.variants.values():
            variant.reset()

    def _param_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        W = self.base_kind.storage(self.base_layer) if self.kind not in ("mha", "param") else self.dense_weight()
        fp_base = W.dtype.is_floating_point and not self.base_kind.quantized
        dtype = W.dtype if fp_base else torch.float32  # quantized bases (any quant_storage): fp32 adapters
        return W.device, dtype

    def _offloaded(self) -> bool:
        """The base weight is not in memory (meta device): an offload wrapper brings it in at call time."""
        W = getattr(self.base_layer, "weight", None)
        return isinstance(W, torch.Tensor) and W.is_meta

    def _label(self) -> str:
        return f"{type(self.base_layer).__name__}({self.in_features}->{self.out_features})"

    def _get_name(self) -> str:  # the repr's head, PEFT's: lora.Linear, lora.Conv2d, lora.ParamWrapper, ...
        return "lora." + self.base_kind.repr_name(self.base_layer)

    def extra_repr(self) -> str:
        adapters = ", ".join(f"{n}: r={self.r[n]}, s={self.scaling[n]:g}" for n in self.lora_A)
        return (f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters=[{adapters}], active={self.active_adapters}" + self.base_kind.repr_extra())
