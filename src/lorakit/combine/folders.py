"""Combine adapter folders into a new adapter folder, without loading the base model.

    report = combine_adapter_dirs(["out/a", "out/b"], [0.7, 0.3], "linear", 16, "out/ab")
    # CLI: lorakit combine out/a out/b --weights 0.7 0.3 --method linear --rank 16 --out out/ab

A LoRA adapter's ΔW = s·B·A needs only its own tensors and config (adapters.files.read_adapter), so the
math of combine.py runs on the files alone and the result is written in PEFT's format (loadable by
lorakit and by peft.PeftModel.from_pretrained). DoRA adapters are the exception: their effective
delta depends on the base weight W0, so they need `base_model` (the transformers model, or a model
with adapters on it: the base weights are read, never changed).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..adapters.files import (EMBEDDING_LAYER_NAMES, PREFIX, factor_key, parse_factor_key, read_adapter,
                              refuse_non_finite, write_adapter)
from ..atomic import refuse_output_onto_inputs
from ..errors import LorakitError
from ..layers import LoraLayer, dense_weight
from .arithmetic import Factors
from .modules import CombineReport, Source, check_kinds, check_options, combine_modules, make_report, new_config


def combine_adapter_dirs(dirs: list[str | Path], weights: list[float], method: str = "linear",
                         rank: int | None = None, out_dir: str | Path = "combined", density: float | None = None,
                         *, majority_sign: str = "total", seed: int | None = None,
                         base_model: nn.Module | None = None) -> CombineReport:
    """Read adapter folders `dirs`, combine them with `weights` by `method`, write the result to `out_dir`.

    Methods and rank as combine.combine_adapters; density for ties/dare/magnitude_prune; seed makes dare
    reproducible. base_model is needed only for DoRA adapters. Returns the report (also written into the
    safetensors metadata under "lorakit").
    """
    dirs = [Path(d) for d in dirs] if isinstance(dirs, (list, tuple)) else dirs
    if not isinstance(dirs, list) or not dirs:
        raise LorakitError(f"give at least one adapter folder to combine (got {dirs!r})")
    refuse_output_onto_inputs(out_dir, dirs, "the combined adapter")
    read = _read_all(dirs)
    labels = [d.name or str(d) for d in dirs]
    if len(set(labels)) < len(labels):  # e.g. run1/adapter and run2/adapter
        labels = [str(d) for d in dirs]
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    problems = check_options(labels, weights, method, rank, density, majority_sign, generator)
    problems += check_kinds(labels, {lb: cfg for lb, (cfg, _) in zip(labels, read)}, method)
    dora = [str(d) for d, (cfg, _) in zip(dirs, read) if cfg.use_dora]
    if dora and base_model is None:
        problems.append(f"{dora} hold DoRA adapters: their effect m·(W0+ΔW)/‖W0+ΔW‖ − W0 depends on the base "
                        "weights W0, so combining them needs the base model: pass base_model=<the model> "
                        "(CLI: --base MODEL)")
    sources, carried, file_problems = _sources(dirs, read)
    LorakitError.collect(problems + file_problems, f"combining {[str(d) for d in dirs]}: "
                                                   f"{len(problems + file_problems)} problem(s):")
    base = _base_weights(base_model) if base_model is not None else None
    fields, factors, infos = combine_modules(sources, list(weights), method, rank, read[0][0].use_rslora,
                                             base_weight=base, density=density, majority_sign=majority_sign,
                                             generator=generator)
    config = new_config(read[0][0], fields, list(factors))
    report = make_report(method, Path(out_dir).name, labels, weights, fields["r"], infos)
    embedding = {mod for mod, srcs in sources.items() if srcs[0].kind == "embedding"}
    _write(Path(out_dir), config, factors, embedding, carried, report)
    return report


def _read_all(dirs: list[Path]) -> list:
    """(config, tensors without the PEFT prefix) per folder; every unreadable folder in one error."""
    read, problems = [], []
    for d in dirs:
        try:
            cfg, tensors = read_adapter(d)
            refuse_non_finite(d, tensors)
            read.append((cfg, {k.removeprefix(PREFIX): v for k, v in tensors.items()}))
        except LorakitError as e:
            problems.append(str(e))
    LorakitError.collect(problems, f"cannot read {len(problems)} adapter folder(s):")
    return read


def _sources(dirs, read) -> tuple[dict[str, list[Source]], dict, list[str]]:
    """Per module the adapters' factors; base embedding weights PEFT saved (carried over); problems."""
    sources: dict[str, list[Source]] = {}
    carried, problems = {}, []
    for i, (d, (cfg, tensors)) in enumerate(zip(dirs, read)):
        parts: dict[str, dict] = {}
        for key, value in tensors.items():
            parsed = parse_factor_key(key)
            if parsed:
                module, part, embedding = parsed
                parts.setdefault(module, {})["m" if part == "magnitude" else part] = value
                parts[module]["kind"] = "embedding" if embedding else "linear"
            elif key.endswith(".lora_velora_embed"):
                continue  # VeLoRA's projection shapes training only, not ΔW; the combined adapter is plain LoRA
            elif set(key.split(".")) & set(EMBEDDING_LAYER_NAMES):
                carried.setdefault(key, value)  # a targeted embedding's base weight, as PEFT saves it
            else:
                problems.append(f"{d}: tensor {key!r} is not a LoRA factor (a bias or a modules_to_save copy?); "
                                "only A, B and DoRA magnitudes can be combined")
        for mod, p in parts.items():
            if "A" not in p or "B" not in p:
                problems.append(f"{d}: module {mod!r} has {'A' if 'A' in p else 'B'} without its partner factor")
                continue
            f = Factors(p["A"], p["B"], cfg.scaling_for(mod))
            sources.setdefault(mod, []).append(Source(i, f, p.get("m"), p["kind"]))
    problems += _shape_problems(dirs, sources)
    return sources, carried, problems


def _shape_problems(dirs, sources) -> list[str]:
    problems = []
    for mod, srcs in sources.items():
        shapes = {(s.factors.B.shape[0], s.factors.A.shape[1]) for s in srcs}
        if len(shapes) > 1:
            where = [str(dirs[s.adapter]) for s in srcs]
            problems.append(f"module {mod!r} has weight shapes {sorted(shapes)} in {where}: the adapters were "
                            "trained on different base models")
    return problems


def _base_weights(base_model: nn.Module):
    """module name -> W0 (out, in), read from the base model (a PeftModel's wrapped model too)."""
    model = base_model.get_base_model() if hasattr(base_model, "get_base_model") else base_model

    def weight(mod: str) -> torch.Tensor:
        try:
            layer = model.get_submodule(mod)
        except AttributeError:
            raise LorakitError(f"the base model has no module {mod!r}: pass the model the adapters were trained "
                               "on") from None
        return (layer.dense_weight() if isinstance(layer, LoraLayer) else dense_weight(layer)).detach()  # (out, in)
    return weight


def _write(out: Path, config, factors: dict[str, Factors], embedding: set[str], carried: dict,
           report: CombineReport) -> None:
    tensors = {}
    for mod, f in factors.items():
        tensors[PREFIX + factor_key(mod, "A", mod in embedding)] = f.A.contiguous()
        tensors[PREFIX + factor_key(mod, "B", mod in embedding)] = f.B.contiguous()
    tensors.update({PREFIX + k: v.contiguous() for k, v in carried.items()})  # base embeddings, as PEFT saves
    info = {"combine": {"method": report.method, "adapters": report.adapters, "weights": report.weights,
                        "max_relative_error": report.max_error, "mean_relative_error": report.mean_error}}
    write_adapter(out, config, tensors, {"lorakit": json.dumps(info)})
