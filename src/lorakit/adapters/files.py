"""Adapters on disk in PEFT's format: the one place that knows its file names and tensor keys.

An adapter folder holds adapter_config.json and adapter_model.safetensors whose keys are PEFT's:
    base_model.model.<module>.lora_A.weight   (r, in)      linear / Conv1D
    base_model.model.<module>.lora_B.weight   (out, r)
    base_model.model.<module>.lora_embedding_A / _B        nn.Embedding, (r, num) and (dim, r)
    base_model.model.<module>.lora_magnitude_vector        DoRA, (out,)
    base_model.model.<module>.lora_diag                    KaSA, (r,)
    base_model.model.<emb>.token_adapter.trainable_tokens_delta   trainable tokens' rows, (k, dim)
    base_model.model.<module>.lora_velora_embed            VeLoRA's projection vector, (ceil(in/groups),)
plus biases (bias='all' / 'lora_only'), modules_to_save copies under the module's own name, and, as
PEFT does when an embedding layer is targeted, the embedding base weights. Safetensors by default;
PEFT's adapter_model.bin (safe_serialization=False) is written and read through binfile.py, with
torch.load(weights_only=True), so no object is ever unpickled. Loading checks every key and shape
first and reports all problems in one error.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_write, disk_full_error
from ..config import ALL_LINEAR, LoraConfig
from ..errors import LorakitError
from . import manage
from . import trainable_tokens as tokens
from .binfile import BIN_NAME, read_bin, write_bin

WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT saves these base weights when targeted
# PEFT's keys of a module's LoRA tensors (after PREFIX): A / B of linear layers, of embeddings, DoRA's m
_FACTOR_KEY = re.compile(r"(?P<module>.*)\.(?:lora_(?P<ab>A|B)\.weight|lora_embedding_(?P<emb>A|B)|"
                         r"(?P<mag>lora_magnitude_vector)(?:\.weight)?)")


def factor_key(module: str, part: str, embedding: bool = False) -> str:
    """PEFT's on-disk key (without PREFIX) of `module`'s tensor `part`: "A", "B" or "magnitude"."""
    if part == "magnitude":
        return f"{module}.lora_magnitude_vector"
    return f"{module}.lora_embedding_{part}" if embedding else f"{module}.lora_{part}.weight"


def parse_factor_key(key: str) -> tuple[str, str, bool] | None:
    """(module, "A" | "B" | "magnitude", is an embedding's) for a LoRA tensor key (PREFIX stripped), else None."""
    m = _FACTOR_KEY.fullmatch(key)
    if m is None:
        return None
    return m["module"], "magnitude" if m["mag"] else (m["ab"] or m["emb"]), m["emb"] is not None


def write_adapter(directory: str | Path, config: LoraConfig, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str], safe_serialization: bool = True) -> Path:
    """Write adapter_model.safetensors (keys as given) and adapter_config.json, each atomically;
    safe_serialization=False: adapter_model.bin instead (PEFT's torch.save file; the metadata is dropped,
    and a stale adapter_model.safetensors there is removed, since readers prefer it)."""
    directory = Path(directory)
    try:
        if safe_serialization:
            atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt", **metadata}))
        else:
            write_bin(directory / BIN_NAME, tensors)
            (directory / WEIGHTS_NAME).unlink(missing_ok=True)
        config.save(directory)
    except Exception as e:  # noqa: BLE001 - a full disk gets a clear error; anything else is raised as it is
        raise disk_full_error(e, directory, sum(t.nbytes for t in tensors.values())) or e
    return directory


def _disk_key(mem_key: str, name: str, embedding_layers: set[str]) -> str | None:
    """In-memory parameter name -> PEFT's on-disk key for adapter `name` (None: not this adapter's)."""
    m = re.fullmatch(rf"(.*)\.lora_(A|B|magnitude_vector)\.{re.escape(name)}", mem_key)
    if m:
        module, part = m.groups()
        part = "magnitude" if part == "magnitude_vector" else part
        return factor_key(module, part, module in embedding_layers)
    m = re.fullmatch(rf"(.*\.token_adapter\.{tokens.DELTA})\.{re.escape(name)}", mem_key)
    if m:  # trainable tokens' rows (a tied head's are the embedding's: never saved twice, see tied_prefixes)
        return m.group(1)
    m = re.fullmatch(rf"(.*)\.lora_diag\.{re.escape(name)}", mem_key)
    if m:  # KaSA's diagonal
        return f"{m.group(1)}.lora_diag"
    m = re.fullmatch(rf"(.*)\.lora_velora_embed\.{re.escape(name)}", mem_key)
    if m:  # a buffer; PEFT saves it (a BufferDict entry) under the module's key without the adapter name
        return f"{m.group(1)}.lora_velora_embed"
    m = re.fullmatch(rf"(.*)\.lora_monteclora_sampler\.{re.escape(name)}\.(.*)", mem_key)
    if m:  # MonteCLoRA's sampler (priors and its last draw), PEFT's keys
        return f"{m.group(1)}.lora_monteclora_sampler.{m.group(2)}"
    m = re.fullmatch(rf"(.*)\.lora_bias\.{re.escape(name)}", mem_key)
    if m:  # PEFT's lora_bias=True: B's bias
        return f"{m.group(1)}.lora_B.bias"
    m = re.fullmatch(rf"(.*)\.modules_to_save\.{re.escape(name)}\.(.*)", mem_key)
    if m:
        return f"{m.group(1)}.{m.group(2)}"
    return None


def _embedding_targeted(model: nn.Module, config: LoraConfig) -> bool:
    spec = config.target_modules
    if isinstance(spec, str):
        return spec != ALL_LINEAR and any(re.fullmatch(spec, n) for n, _ in model.named_modules()
                                          if any(re.match(rf"(.*\.)?{e}$", n) for e in EMBEDDING_LAYER_NAMES))
    return any(e in (spec or []) for e in EMBEDDING_LAYER_NAMES)


def adapter_state_dict(model: nn.Module, name: str = "default", save_embedding_layers: bool | str = "auto",
                       prefix: str = PREFIX, state: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of adapter `name` under PEFT's on-disk keys (taken from `state`, a state dict of
    `model` under its own names, when given: e.g. one gathered from a sharded copy)."""
    config = manage.configs(model)[name]
    embedding_layers = {n for n, layer in manage.lora_layers(model) if layer.kind == "embedding"}
    state = model.state_dict() if state is None else state
    tied = tokens.tied_prefixes(model)
    out = {}
    for key, value in state.items():
        disk = _disk_key(key, name, embedding_layers)
        if disk is not None and not (tied and key.startswith(tied)):
            out[disk] = value
    if config.bias == "all":
        out.update({k: v for k, v in state.items() if "bias" in k and ".lora_" not in k
                    and ".modules_to_save." not in k and ".original_module." not in k})
    elif config.bias == "lora_only":
        out.update({f"{n}.base_layer.bias": layer.base_layer.bias for n, layer in manage.lora_layers(model)
                    if getattr(layer.base_layer, "bias", None) is not None})
    targeted = _embedding_targeted(model, config)
    auto = save_embedding_layers == "auto" and targeted and config.trainable_token_indices is None  # PEFT's rule
    if auto:  # PEFT's warnings, in its words
        warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
                      stacklevel=3)
    if save_embedding_layers is True or auto:
        if not hasattr(model, "get_input_embeddings"):
            warnings.warn("Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                          stacklevel=3)
        out.update(_embedding_base_weights(model, state, only_wrapped=targeted))
    return {prefix + k: v.detach().contiguous() for k, v in out.items()}


def _embedding_base_weights(model: nn.Module, state: dict, only_wrapped: bool) -> dict:
    """Input/output embedding weights (PEFT: when embeddings are targeted, only LoRA-wrapped ones)."""
    found = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is None or (only_wrapped and not hasattr(module, "base_layer")):
            continue
        name = next((n for n, m in model.named_modules() if m is module), None)
        if name:
            found.update({k: v for k, v in state.items() if k.startswith(f"{name}.") and ".lora_" not in k
                          and ".trainable_tokens_" not in k})
    return found


def save_adapter(model: nn.Module, directory: str | Path, name: str = "default",
                 save_embedding_layers: bool | str = "auto", base_model_name_or_path: str | None = None,
                 tensors: dict[str, torch.Tensor] | None = None, safe_serialization: bool = True) -> Path:
    """Write adapter `name` as adapter_config.json + adapter_model.safetensors (each file atomically;
    safe_serialization=False: adapter_model.bin, as PEFT). tensors: the adapter's tensors under PEFT keys
    when already taken (gathered from a sharded model)."""
    manage._check_name(model, name, must_exist=True)
    directory = Path(directory)
    config = manage.configs(model)[name]
    if base_model_name_or_path is None:
        base_model_name_or_path = config.base_model_name_or_path or getattr(
            getattr(model, "config", None), "_name_or_path", None) or None
    config = config.replace(base_model_name_or_path=base_model_name_or_path)
    if tensors is None:
        tensors = adapter_state_dict(model, name, save_embedding_layers)
    return write_adapter(directory, config, tensors, {"lorakit": json.dumps({"lora_fa": config.lora_fa})},
                         safe_serialization)


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of the tensors that hold NaN or Inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]


def refuse_non_finite(directory: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    bad = non_finite(tensors)
    if bad:
        raise LorakitError(f"the adapter in {directory} holds NaN/Inf in {len(bad)} tensor(s), e.g. {bad[:2]}: it "
                           "is broken (did training diverge?); use an earlier checkpoint or train it again")


def read_adapter(directory: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter folder (lorakit's or PEFT's) without a model: its config and tensors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LorakitError(f"adapter folder {str(directory)!r} does not exist")
    config = LoraConfig.load(directory)
    path = weights_path(directory)
    if not path.is_file():
        raise LorakitError(f"{path} not found (nor {BIN_NAME}): an adapter folder holds its tensors in one of them")
    if path.name == BIN_NAME:
        return config, read_bin(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise LorakitError(f"{path} is not a readable safetensors file ({e}); re-save the adapter") from None
    extras = json.loads(meta.get("lorakit", "{}"))
    if extras.get("lora_fa"):
        config = config.replace(lora_fa=True)
    return config, tensors


def weights_path(directory: str | Path) -> Path:
    """The folder's tensor file: adapter_model.safetensors, else adapter_model.bin if only that exists."""
    directory = Path(directory)
    bin_path = directory / BIN_NAME
    return bin_path if not (directory / WEIGHTS_NAME).is_file() and bin_path.is_file() else directory / WEIGHTS_NAME


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default", is_trainable: bool = False,
                 activate: bool = True, config: LoraConfig | None = None,
                 autocast_adapter_dtype: bool = True) -> nn.Module:
    """Add adapter `name` from a folder written by lorakit or PEFT, checking every key and shape; with
    `config`, the folder's tensors load under that config instead of the folder's own."""
    file_config, tensors = read_adapter(directory)
    config = file_config if config is None else config
    return attach_adapter(model, config, tensors, directory, name, is_trainable, activate, autocast_adapter_dtype)


def attach_adapter(model: nn.Module, config: LoraConfig, tensors: dict, directory: str | Path, name: str = "default",
                   is_trainable: bool = False, activate: bool = True,
                   autocast_adapter_dtype: bool = True) -> nn.Module:
    """Add adapter `name` from what read_adapter(directory) returned (a server reads files off its
    engine thread and attaches between steps)."""
    # no init draws, the file's values replace them; MiCA keeps its init, which makes its variant (B frozen), as PEFT
    init = "mica" if config.init_lora_weights == "mica" else False
    init_config = config.replace(init_lora_weights=init, inference_mode=not is_trainable)
    state = _strip_prefix(tensors)
    try:
        manage.add_adapter(model, init_config, name, activate=activate, autocast_adapter_dtype=autocast_adapter_dtype)
    except LorakitError as e:
        raise LorakitError(f"the adapter in {directory} does not fit this model (was it trained on another base "
                           f"model? it names {config.base_model_name_or_path!r}):\n{e}") from None
    try:
        _copy_in(model, state, name, str(weights_path(directory)))
    except LorakitError:
        manage.delete_adapter(model, name)
        raise
    manage.configs(model)[name] = config.replace(inference_mode=not is_trainable)
    if not is_trainable:  # this adapter only: one being trained next to it stays trainable (as PEFT)
        manage.set_trainable(model, name, False)
        others = any(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n or ".modules_to_save." in n)
        if config.bias != "none" and not others:  # the biases it opened, unless another adapter trains
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.requires_grad_(False)
    return model


def load_weights(model: nn.Module, directory: str | Path, name: str = "default") -> None:
    """Copy the tensors of an adapter folder into the existing adapter `name` (e.g. to resume training)."""
    _, tensors = read_adapter(directory)
    _copy_in(model, _strip_prefix(tensors), name, str(weights_path(directory)))


def _strip_prefix(tensors: dict) -> dict:
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}


def adapter_targets(model: nn.Module, name: str) -> tuple[dict, dict]:
    """({disk key (PREFIX stripped): tensor} of adapter `name`, all parameters and buffers by name); buffers
    count: a modules_to_save BatchNorm's running statistics are saved and loaded like its weights."""
    embedding_layers = {n for n, layer in manage.lora_layers(model) if layer.kind == "embedding"}
    params = {**dict(model.named_buffers(remove_duplicate=False)), **dict(model.named_parameters(remove_duplicate=False))}
    wanted = {}  # disk key -> in-memory parameter
    tied = tokens.tied_prefixes(model)
    for key, p in params.items():
        disk = _disk_key(key, name, embedding_layers)
        if disk is not None and not (tied and key.startswith(tied)):
            wanted[disk] = p
    return wanted, params


def _copy_in(model: nn.Module, state: dict, name: str, source: str) -> None:
    wanted, params = adapter_targets(model, name)
    problems = []
    missing = [k for k in wanted if k not in state]
    if missing:
        problems.append(f"{len(missing)} adapter tensor(s) missing from the file, e.g. {missing[:3]}")
    for key, value in state.items():
        target = load_target(wanted, params, key)
        if target is None:
            problems.append(f"tensor {key!r} matches no module of this model (was the adapter trained on "
                            f"another base model?)")
        elif tuple(target.shape) != tuple(value.shape):
            problems.append(f"tensor {key!r} has shape {tuple(value.shape)} but this model needs "
                            f"{tuple(target.shape)} (another base model or another r?)")
    LorakitError.collect(problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else []),
                         f"{source} does not fit this model:")
    devices = adapter_devices(model)
    with torch.no_grad():
        for key, value in state.items():
            fill(load_target(wanted, params, key), value, devices)


def adapter_devices(model: nn.Module) -> dict[int, torch.device]:
    """id(adapter tensor) -> the device of its layer's base weight (where a meta tensor is to be loaded)."""
    devices = {}
    for _, layer in manage.lora_layers(model):
        device = layer._param_device_dtype()[0]
        for store in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector, layer.lora_bias, layer.lora_diag):
            devices.update({id(p): device for p in store.values()})
    return devices


def fill(target: torch.Tensor, value: torch.Tensor, devices: dict | None = None) -> None:
    """Load `value` into the model tensor `target`: a copy in place; for a tensor still on the meta device
    (low_cpu_mem_usage), the value itself on its base layer's device (`devices`) and in the tensor's dtype;
    for a sharded one (FSDP2's DTensor), its own shard of the value."""
    if target.is_meta:  # a tensor cannot move off the meta device in place: swap in a real one (same object)
        device = (devices or {}).get(id(target), value.device)
        real = value.detach().to(device, target.dtype).clone()
        torch.utils.swap_tensors(target, type(target)(real, requires_grad=target.requires_grad)
                                 if isinstance(target, nn.Parameter) else real)
        return
    value = value.to(target.dtype)
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(target, DTensor):  # src_data_rank=None: every rank cuts its shard from its own copy
        value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
    target.copy_(value)


def load_target(wanted: dict, params: dict, key: str):
    """The parameter a file key loads into: an adapter tensor, a base parameter (bias, embedding) under
    its own name, or one saved under the unwrapped name that now lives at '.base_layer.'."""
    for found in (wanted.get(key), params.get(key)):
        if found is not None:
            return found
    module, _, leaf = key.rpartition(".")
    return params.get(f"{module}.base_layer.{leaf}")
