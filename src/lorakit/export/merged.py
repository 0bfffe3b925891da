"""The base with its adapter merged, as a GGUF model file that llama.cpp and Ollama load as they are.

The header (hyperparameters, tokenizer, chat template: every KV pair) is carried from the base's own
GGUF, and so are tensors the transformers model does not have (e.g. rope_freqs). Every weight of the
merged model (W + s·B·A, DoRA's rescaled W, modules_to_save copies; a QLoRA base dequantized first) is
written in GGUF names and row order (layout.py), 2-D weights in the chosen type (f32, f16, q8_0, q4_0;
quantized with gguf.quants, a row whose length is not a multiple of 32 falls back to f16 as llama.cpp's
converter does) and 1-D tensors (norms, biases) in f32. general.file_type says the chosen type.
"""

from __future__ import annotations

import os
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..adapters.quantize import merge_to_full_precision
from ..atomic import atomic_write
from ..errors import LorakitError
from .basefile import architecture, header, reader
from .layout import Layout, layout_of

log = logging.getLogger(__name__)
QUANTS = ("f32", "f16", "q8_0", "q4_0")


def _types(quant: str):
    import gguf
    t, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {"f32": (t.F32, f.ALL_F32), "f16": (t.F16, f.MOSTLY_F16), "q8_0": (t.Q8_0, f.MOSTLY_Q8_0),
            "q4_0": (t.Q4_0, f.MOSTLY_Q4_0)}[quant]


def merged_tensors(model: nn.Module, layout: Layout) -> dict[str, np.ndarray]:
    """The plain model's tensors under GGUF names, numpy (out, in) float32, q/k rows in GGUF order."""
    out, unknown = {}, []
    for key, value in model.state_dict().items():
        name = layout.gguf_name(key)
        if name is None:
            unknown.append(key)
            continue
        out[name] = layout.to_gguf_rows(key, value.detach().float().cpu().numpy())
    if unknown:
        raise LorakitError(f"{len(unknown)} tensor(s) of the merged model have no place in llama.cpp's "
                           f"{layout.arch} layout, e.g. {unknown[:3]}")
    return out


def encoded(name: str, data: np.ndarray, quant: str):
    """(array, raw ggml type) of one tensor in the chosen type; 1-D tensors stay f32."""
    import gguf
    qtype, _ = _types(quant)
    if data.ndim < 2 or quant == "f32":
        return np.ascontiguousarray(data, dtype=np.float32), gguf.GGMLQuantizationType.F32
    if quant == "f16":
        return np.ascontiguousarray(data, dtype=np.float16), gguf.GGMLQuantizationType.F16
    try:
        return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype), qtype
    except gguf.QuantError:
        log.info("%s %s cannot be %s (row length not a multiple of 32): written as f16", name, data.shape, quant)
        return np.ascontiguousarray(data, dtype=np.float16), gguf.GGMLQuantizationType.F16


def write_merged_gguf(model: nn.Module, base_gguf: str | Path, out: str | Path, quant: str = "f16") -> Path:
    """Write a plain (already merged) model as a GGUF with base_gguf's header and extra tensors, atomically."""
    import gguf
    if quant not in QUANTS:
        raise LorakitError(f"--quant {quant!r} is not one of {', '.join(QUANTS)}")
    layout = layout_of(model.config)
    r = reader(base_gguf)
    arch = architecture(r, base_gguf)
    if arch != layout.arch:
        raise LorakitError(f"the base GGUF {base_gguf} is a {arch!r} model but the merged model is "
                           f"{layout.arch!r}: give the GGUF of the adapter's own base model")
    tensors = merged_tensors(model, layout)
    names = {t.name for t in r.tensors}
    if layout.tied and "output.weight" not in names:
        tensors.pop("output.weight", None)  # llama.cpp reuses token_embd, as in the base file
    _, file_type = _types(quant)

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, arch=arch)
        for key, value, vtype, sub in header(r):
            if key == gguf.Keys.General.FILE_TYPE:
                value = int(file_type)
            w.add_key_value(key, value, vtype, sub_type=sub)
        if gguf.Keys.General.FILE_TYPE not in r.fields:
            w.add_file_type(int(file_type))
        for t in r.tensors:
            data = tensors.pop(t.name, None)
            if data is None:  # not a transformers weight (e.g. rope_freqs): as in the base file
                w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
                continue
            want = tuple(int(x) for x in reversed(t.shape.tolist()))
            if data.shape != want:
                raise LorakitError(f"{t.name} is {want} in {base_gguf} but {data.shape} in the merged model: "
                                   "the GGUF is not this adapter's base model")
            array, raw = encoded(t.name, data, quant)
            w.add_tensor(t.name, array, raw_dtype=raw)
        for name, data in tensors.items():  # e.g. an untied output.weight the base file did not need
            array, raw = encoded(name, data, quant)
            w.add_tensor(name, array, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=True)
        w.close()

    atomic_write(out, write)
    os.chmod(out, 0o644)  # mkstemp's 0600 is for the temporary file only
    return Path(out)


def merge_in_full_precision(model: nn.Module) -> nn.Module:
    """A plain fp32 model with every adapter merged (QLoRA bases dequantized first, DoRA included)."""
    return merge_to_full_precision(model, dtype=torch.float32, safe_merge=True)


def export_merged_gguf(model: nn.Module, base_gguf: str | Path, out: str | Path, quant: str = "f16") -> Path:
    """Merge the adapters of `model` in fp32 and write the result as a GGUF with base_gguf's header."""
    layout_of(model.config)  # refuse other architectures before merging
    return write_merged_gguf(merge_in_full_precision(model), base_gguf, out, quant)
