"""A lorakit adapter as a llama.cpp LoRA adapter GGUF (general.type=adapter, adapter.type=lora).

Tensors: <base GGUF tensor>.lora_a = A as is, numpy (r, in); <base>.lora_b = B, numpy (out, r), its rows
in GGUF order (q/k permuted for the llama architecture: P(W + s·B·A) = P·W + s·(P·B)·A). Both F32.

The scale. llama.cpp applies, per tensor, s_cpp = user_scale · alpha / rank with rank = B's column count
and one alpha per file (alpha = 0: s_cpp = user_scale). lorakit's s is per module: alpha/r, alpha/sqrt(r)
with rsLoRA, rank_pattern / alpha_pattern per module. The file's alpha is the config's lora_alpha
(times sqrt(r) with rsLoRA, so a uniform rsLoRA adapter keeps B as it is); wherever s differs from
s_cpp at user_scale 1 the ratio s / s_cpp is folded into that module's B, so llama.cpp at --lora-scale 1
computes exactly lorakit's s·B·A for every module.

What a llama.cpp adapter cannot hold is refused with a pointer to the merged export: DoRA (a per-row
rescaling), modules_to_save (full weights), LoRA biases, embedding adapters, and lm_head adapters on
tied-embedding models (llama.cpp has no separate output tensor to adapt there).
"""

from __future__ import annotations

import os
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from ..adapters import manage
from ..atomic import atomic_write
from ..errors import LorakitError
from .layout import Layout, layout_of

MERGED_HINT = ("export the merged model instead: `lorakit export ADAPTER --format gguf --merged --out model.gguf` "
               "(or --format hf for a transformers folder)")


@dataclass
class LoraPair:
    """One adapted tensor: GGUF base name ('blk.0.attn_q.weight'), A (r, in), B (out, r) in GGUF row order,
    and lorakit's scale s for it."""

    name: str
    A: np.ndarray
    B: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return self.B.shape[1]


def llama_cpp_scale(alpha: float, rank: int, user_scale: float = 1.0) -> float:
    """llama.cpp's llama_adapter_lora_weight::get_scale, in float32 as there."""
    f = np.float32
    return float(f(user_scale) * f(alpha) / f(rank)) if alpha else float(f(user_scale))


def file_alpha(config) -> float:
    """adapter.lora.alpha to write: lora_alpha, times sqrt(r) for rsLoRA (then alpha/r = lora_alpha/sqrt(r))."""
    alpha = float(config.lora_alpha)
    return float(np.float32(alpha * math.sqrt(config.r) if config.use_rslora else alpha))


def lora_pairs(model: nn.Module, name: str = "default", layout: Layout | None = None) -> list[LoraPair]:
    """Adapter `name` of `model` as GGUF LoRA pairs, refusing what a llama.cpp adapter cannot express."""
    manage._check_name(model, name, must_exist=True)
    config = manage.configs(model)[name]
    layout = layout or layout_of(model.config)
    problems = []
    if config.use_dora:
        problems.append("DoRA (use_dora) rescales each output row by a learned magnitude")
    if config.modules_to_save:
        problems.append(f"modules_to_save {config.modules_to_save} are full trained copies of modules")
    if config.kasa_config is not None:
        problems.append("KaSA (kasa_config) truncates the base weights and scales B·A by a learned diagonal")
    if config.trainable_token_indices is not None:
        problems.append("trainable_token_indices replaces embedding rows, which a llama.cpp adapter cannot carry")
    if config.bias != "none":
        problems.append(f"bias={config.bias!r} trains biases")
    pairs = []
    for module, layer in manage.lora_layers(model):
        if name not in layer.lora_A:
            continue
        if layer.kind != "linear":
            problems.append(f"{module} is an {layer.kind} adapter")
            continue
        target = layout.gguf_name(module + ".weight")
        if target is None:
            problems.append(f"{module} has no tensor in llama.cpp's {layout.arch} layout")
            continue
        if target == "output.weight" and layout.tied:
            problems.append(f"{module} (lm_head) is tied to the input embedding in this model")
            continue
        A, B = (t.detach().float().cpu().numpy() for t in layer.factors(name))  # dense (BD-LoRA's blocks too)
        pairs.append(LoraPair(target, np.ascontiguousarray(A), layout.to_gguf_rows(module, B),
                              float(layer.scaling[name])))
    if problems:
        raise LorakitError("this adapter cannot be written as a llama.cpp LoRA adapter:\n  - "
                           + "\n  - ".join(problems[:8]) + f"\n  {MERGED_HINT}")
    if not pairs:
        raise LorakitError(f"adapter {name!r} adapts no module; nothing to export")
    return pairs


def folded(pairs: list[LoraPair], alpha: float) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, A, B') with B' = B · s / s_cpp, so llama.cpp's alpha/rank rule gives back lorakit's s."""
    out = []
    for p in pairs:
        ratio = p.scale / llama_cpp_scale(alpha, p.rank)
        B = p.B if ratio == 1.0 else (p.B.astype(np.float64) * ratio).astype(np.float32)
        out.append((p.name, p.A, B))
    return out


def write_lora_gguf(path: str | Path, arch: str, tensors: list[tuple[str, np.ndarray, np.ndarray]],
                    alpha: float, title: str = "lorakit adapter") -> Path:
    """Write (name, A, B) pairs as they are (no scale folding) into a llama.cpp adapter file, atomically."""
    import gguf

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch=arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        w.add_name(title)
        for name, A, B in tensors:
            w.add_tensor(name + ".lora_a", np.ascontiguousarray(A, dtype=np.float32))  # ne [in, r]
            w.add_tensor(name + ".lora_b", np.ascontiguousarray(B, dtype=np.float32))  # ne [r, out]
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write(path, write)
    os.chmod(path, 0o644)  # mkstemp's 0600 is for the temporary file only
    return Path(path)


def check_against_base(pairs: list[LoraPair], base_gguf: str | Path, arch: str) -> None:
    """Every pair names a tensor of the base GGUF with the right shape (llama.cpp would crash otherwise)."""
    from .basefile import tensor_shapes
    base_arch, shapes = tensor_shapes(base_gguf)
    problems = [] if base_arch == arch else [f"the base GGUF is a {base_arch!r} model, the adapter {arch!r}"]
    for p in pairs:
        want = (p.B.shape[0], p.A.shape[1])
        if p.name not in shapes:
            problems.append(f"{p.name} is not a tensor of {base_gguf}")
        elif shapes[p.name] != want:
            problems.append(f"{p.name} is {shapes[p.name]} in {base_gguf}, the adapter's is {want}")
    LorakitError.collect(problems[:8], f"the adapter does not fit the base GGUF {base_gguf} (another base model?):")


def export_adapter_gguf(model: nn.Module, out: str | Path, name: str = "default",
                        base_gguf: str | Path | None = None) -> Path:
    """Write adapter `name` of `model` as a llama.cpp LoRA adapter GGUF; check it against base_gguf if given."""
    layout = layout_of(model.config)
    pairs = lora_pairs(model, name, layout)
    if base_gguf is not None:
        check_against_base(pairs, base_gguf, layout.arch)
    alpha = file_alpha(manage.configs(model)[name])
    return write_lora_gguf(out, layout.arch, folded(pairs, alpha), alpha)
