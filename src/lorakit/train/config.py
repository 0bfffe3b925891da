"""Run configs: what one training run does, from defaults, then a YAML file, then --set overrides.

A file holds one run (sections model, data, lora, train, output_dir) or several named runs under
`runs:` (with an optional `defaults:` section they share), picked with --run NAME. These keys are a
contract for docs and users' scripts: model, data.train, data.eval, lora.r, lora.alpha, lora.dropout,
lora.target_modules, lora.variant, train.max_steps / train.epochs, train.batch_size, train.grad_accum,
train.learning_rate, train.seed, output_dir. Unknown keys are errors with file:line and a suggestion.
Config flows one way: this module builds plain dataclasses; library classes never read it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import LoraConfig, VeloraConfig
from ..errors import LorakitError
from ..models.quantize import QUANT_KINDS
from .optim import OPTIMIZERS
from .trackers import TRACKERS


@dataclass
class DataSection:
    train: str | None = None  # JSONL / JSON / CSV / Parquet / .arrow, a save_to_disk folder, hf:org/name[:split]
    eval: str | None = None
    eval_fraction: float = 0.0  # held out from train when no eval file is given
    max_length: int = 512  # tokens; longer examples are truncated (and counted)
    pack: bool = False  # pack short examples into full rows (attention never crosses them)
    train_on_prompt: bool = False  # False: loss on completion / assistant tokens only
    on_error: str = "fail"  # bad lines: "fail" or "skip"


@dataclass
class LoraSection:
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: Any = "all-linear"  # list, regex, or "all-linear"
    variant: str = "lora"  # lora | dora | lora_fa | velora (PEFT's VeloraConfig defaults)
    rslora: bool = False
    init: Any = True  # True | "gaussian" | "pissa"
    quantize: str = "none"  # none | nf4 | fp4 | int8 (QLoRA)
    modules_to_save: list | None = None
    trainable_token_indices: Any = None  # token ids whose embedding rows train (new special tokens), or {module: ids}


@dataclass
class TrainSection:
    max_steps: int | None = None  # optimizer steps; wins over epochs
    epochs: float | None = None  # default 1 when max_steps is not given
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    learning_rate: float = 2e-4
    optimizer: str = "adamw"  # adamw | adamw_8bit | paged_adamw_8bit (bitsandbytes) | adafactor | sgd (momentum 0.9)
    lora_plus_ratio: float | None = None  # LoRA+: B's learning rate = learning_rate * ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # clip; 0 disables
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    seed: int = 0
    precision: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False  # recompute each decoder layer in backward: less memory, ~40% more time
    compile: bool = False  # torch.compile each decoder layer (first step compiles; pays on long runs)
    group_by_length: bool = True
    flat_batches: bool = True  # a batch's examples end to end in one row: no padding computed
    eval_every: int = 0  # steps; 0 = only at the end
    early_stopping_patience: int = 0  # evals without improvement before stopping; 0 = off
    save_every: int = 0  # steps between checkpoints; 0 = only at the end / on interrupt
    keep_checkpoints: int = 2
    log_every: int = 1
    report_to: list = field(default_factory=list)  # any of tensorboard, mlflow, wandb (trackers.py)
    device: str = "auto"
    # under torchrun (more than one process): ddp (adapter gradients all-reduced) | fsdp (FSDP2: the frozen
    # base sharded too, for a base that does not fit one device); batch_size is per process
    distributed: str = "ddp"
    distributed_timeout: float = 600  # seconds a collective waits for a rank before the run fails


@dataclass
class ModelKwargsSection:
    """How transformers places the base (from_pretrained's own keys): big bases on small devices."""
    device_map: Any = None  # None | auto | balanced | balanced_low_0 | sequential | cpu | cuda | {module: device}
    max_memory: Any = None  # {device: "2GiB"}, e.g. {0: 20GiB, cpu: 60GiB}; the rest is offloaded to disk
    offload_folder: str | None = None  # for disk offload of non-safetensors weights (safetensors are read in place)
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2 (transformers' choice when unset)


@dataclass
class RunConfig:
    model: str = "smollm2-135m-instruct"
    output_dir: str = "runs/default"
    name: str = "default"
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    model_kwargs: ModelKwargsSection = field(default_factory=ModelKwargsSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads 1e-3 as a string; users mean a float (a learning rate), so read it as one."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|\.[0-9_]+(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


SECTIONS = {"data": DataSection, "lora": LoraSection, "train": TrainSection, "model_kwargs": ModelKwargsSection}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda")
TOP_KEYS = {"model", "output_dir", "name"} | set(SECTIONS)
VARIANTS = ("lora", "dora", "lora_fa", "velora")


def load_run(path: str | Path | None = None, run: str | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults < file (one run, or the named run) < overrides ("section.key=value")."""
    raw, lines, source = {}, {}, "defaults"
    if path is not None:
        raw, lines = _read_yaml(Path(path))
        source = str(path)
        raw, lines = _pick_run(raw, lines, run, source)
    elif run is not None:
        raise LorakitError("--run needs a config file that defines named runs")
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        lines[key] = f"--set {item}"
    cfg = _build(raw, lines, source)
    if run:
        cfg.name = run
    return cfg


def _read_yaml(path: Path) -> tuple[dict, dict]:
    if not path.is_file():
        raise LorakitError(f"config file {str(path)!r} not found")
    text = path.read_text()
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = _yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise LorakitError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise LorakitError(f"{path}: the top level must be a mapping of sections (model, data, lora, train)")
    return data, _key_lines(node, "", path)


def _key_lines(node, prefix: str, path: Path) -> dict[str, str]:
    """'lora.r' -> 'file.yaml:7' for every key, from the YAML node tree."""
    out = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            out[key] = f"{path}:{key_node.start_mark.line + 1}"
            out.update(_key_lines(value_node, key + ".", path))
    return out


def _pick_run(raw: dict, lines: dict, run: str | None, source: str) -> tuple[dict, dict]:
    if "runs" not in raw:
        if run is not None:
            raise LorakitError(f"{source} defines a single run (no 'runs:' section); drop --run {run}")
        return raw, lines
    runs = raw.get("runs") or {}
    if run is None:
        raise LorakitError(f"{source} defines several runs; pick one with --run NAME: {sorted(runs)}")
    if run not in runs:
        close = difflib.get_close_matches(run, list(runs), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise LorakitError(f"{source}: no run named {run!r}{hint} Runs: {sorted(runs)}")
    merged = _deep_merge(raw.get("defaults") or {}, runs[run] or {})
    line_map = {k.split(".", 1)[1]: v for k, v in lines.items() if k.startswith("defaults.")}
    line_map.update({k.split(".", 2)[2]: v for k, v in lines.items() if k.startswith(f"runs.{run}.")})
    return merged, line_map


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise LorakitError(f"--set {item!r}: expected section.key=value, e.g. --set train.max_steps=100")
    key, value = item.split("=", 1)
    try:
        return key.strip(), _yaml(value)
    except yaml.YAMLError:
        return key.strip(), value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise LorakitError(f"--set {key}: {p!r} is not a section")
    node[parts[-1]] = value


def _build(raw: dict, lines: dict, source: str) -> RunConfig:
    problems = []
    where = lambda key: lines.get(key, source)  # noqa: E731
    for key in raw:
        if key not in TOP_KEYS:
            problems.append(f"{where(key)}: {_unknown(key, TOP_KEYS)}")
    sections = {}
    for name, cls in SECTIONS.items():
        values = raw.get(name) or {}
        if not isinstance(values, dict):
            problems.append(f"{where(name)}: '{name}' must be a mapping of keys")
            continue
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                problems.append(f"{where(f'{name}.{key}')}: {_unknown(f'{name}.{key}', {f'{name}.{k}' for k in known})}")
        sections[name] = cls(**{k: v for k, v in values.items() if k in known})
    top = {k: raw[k] for k in ("model", "output_dir", "name") if k in raw}
    cfg = RunConfig(**top, **sections)
    typed = _type_problems(cfg)
    problems += [f"{where(k)}: {msg}" for k, msg in typed]
    if not typed:  # values of the right types: now their ranges, and the LoraConfig they make
        problems += [f"{where(k)}: {msg}" for k, msg in _value_problems(cfg) + _lora_problems(cfg)
                                                       + _placement_problems(cfg.model_kwargs)]
    LorakitError.collect(problems, f"Invalid run config ({source}):")
    return cfg


def _allowed(annotation: str) -> tuple[type, ...] | None:
    """The types a field's annotation admits (None: anything), from its source text ("int | None")."""
    names = {"int": int, "float": (int, float), "bool": bool, "str": str, "list": list, "None": type(None)}
    parts = [part.strip() for part in annotation.split("|")]
    if "Any" in parts:
        return None
    out = []
    for part in parts:
        kind = names[part]
        out += list(kind) if isinstance(kind, tuple) else [kind]
    return tuple(out)


def _described(annotation: str) -> str:
    words = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "list": "a list",
             "None": "null"}
    return " or ".join(words[part.strip()] for part in annotation.split("|"))


def _type_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """Every key whose value has the wrong type for its field (a quoted "false" for a bool, a list for an
    int), named by its dotted key; True/False are not accepted as numbers."""
    p = []
    items = [(f"{name}.{f.name}", f, getattr(getattr(cfg, name), f.name))
             for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    items += [(f.name, f, getattr(cfg, f.name)) for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
    for key, f, value in items:
        allowed = _allowed(f.type)
        if allowed is None:
            continue
        is_bool = isinstance(value, bool)
        if not isinstance(value, allowed) or (is_bool and bool not in allowed):
            hint = " (without quotes)" if isinstance(value, str) and bool in allowed else ""
            p.append((key, f"{key} must be {_described(f.type)}{hint}, got {value!r} ({type(value).__name__})"))
    return p


# LoraConfig field -> the run key it comes from (lora_config below is the other direction)
_LORA_KEYS = {"r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
              "target_modules": "lora.target_modules", "init_lora_weights": "lora.init",
              "modules_to_save": "lora.modules_to_save", "use_rslora": "lora.rslora", "use_dora": "lora.variant",
              "lora_fa": "lora.variant", "velora_config": "lora.variant", "base_model_name_or_path": "model",
              "trainable_token_indices": "lora.trainable_token_indices"}


def _placement_problems(m: ModelKwargsSection) -> list[tuple[str, str]]:
    p = []
    if m.device_map is not None and not isinstance(m.device_map, dict) and m.device_map not in DEVICE_MAPS:
        p.append(("model_kwargs.device_map", f"model_kwargs.device_map must be one of {', '.join(DEVICE_MAPS)} or a "
                                             f"mapping of module names to devices (got {m.device_map!r})"))
    if m.max_memory is not None:
        if not isinstance(m.max_memory, dict) or not all(isinstance(v, (int, str)) for v in m.max_memory.values()):
            p.append(("model_kwargs.max_memory", "model_kwargs.max_memory must map devices to sizes, e.g. "
                                                 f"{{0: 20GiB, cpu: 60GiB}} (got {m.max_memory!r})"))
        elif m.device_map is None:
            p.append(("model_kwargs.max_memory", "model_kwargs.max_memory only applies with a device map: "
                                                 "add model_kwargs.device_map: auto"))
    return p


def _lora_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    """The LoraConfig the run makes, checked now, its problems named by the run keys they come from."""
    try:
        lora_config(cfg)
    except LorakitError:
        unchecked = LoraConfig.__new__(LoraConfig)
        for name, value in _lora_fields(cfg).items():
            setattr(unchecked, name, value)
        for f in dataclasses.fields(LoraConfig):
            if f.name not in _lora_fields(cfg):
                setattr(unchecked, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING
                        else f.default)
        return [(_LORA_KEYS.get(name, "lora"), msg.replace(f"{name} ", f"{_LORA_KEYS.get(name, name)} ", 1))
                for name, msg in unchecked.field_problems()]
    return []


def _unknown(key: str, known) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")


def _value_problems(cfg: RunConfig) -> list[tuple[str, str]]:
    p, t, d, lo = [], cfg.train, cfg.data, cfg.lora
    if not d.train:
        p.append(("data.train", "data.train is required: a JSONL file of training examples"))
    if lo.variant not in VARIANTS:
        p.append(("lora.variant", f"lora.variant must be one of {VARIANTS} (got {lo.variant!r})"))
    if lo.quantize not in QUANT_KINDS:
        p.append(("lora.quantize", f"lora.quantize must be one of {list(QUANT_KINDS)} (got {lo.quantize!r})"))
    for key, value, low in (("train.batch_size", t.batch_size, 1), ("train.grad_accum", t.grad_accum, 1),
                            ("data.max_length", d.max_length, 8), ("train.log_every", t.log_every, 1)):
        if not isinstance(value, int) or value < low:
            p.append((key, f"{key} must be an integer >= {low} (got {value!r})"))
    if t.max_steps is not None and (not isinstance(t.max_steps, int) or t.max_steps < 1):
        p.append(("train.max_steps", f"train.max_steps must be a positive integer (got {t.max_steps!r})"))
    if t.epochs is not None and (not isinstance(t.epochs, (int, float)) or t.epochs <= 0):
        p.append(("train.epochs", f"train.epochs must be > 0 (got {t.epochs!r})"))
    if not isinstance(t.learning_rate, (int, float)) or t.learning_rate <= 0:
        p.append(("train.learning_rate", f"train.learning_rate must be > 0 (got {t.learning_rate!r})"))
    if t.schedule not in ("cosine", "linear", "constant"):
        p.append(("train.schedule", f"train.schedule must be cosine, linear or constant (got {t.schedule!r})"))
    if t.optimizer not in OPTIMIZERS:
        p.append(("train.optimizer", f"train.optimizer must be one of {', '.join(OPTIMIZERS)} (got {t.optimizer!r})"))
    unknown = [name for name in t.report_to if name not in TRACKERS]
    if unknown:
        p.append(("train.report_to", f"train.report_to: unknown tracker(s) {unknown}; use any of "
                                     f"{', '.join(TRACKERS)}, e.g. [tensorboard, mlflow]"))
    if t.precision not in ("auto", "fp32", "bf16", "fp16"):
        p.append(("train.precision", f"train.precision must be auto, fp32, bf16 or fp16 (got {t.precision!r})"))
    if d.on_error not in ("fail", "skip"):
        p.append(("data.on_error", f"data.on_error must be 'fail' or 'skip' (got {d.on_error!r})"))
    if not 0 <= d.eval_fraction < 1:
        p.append(("data.eval_fraction", f"data.eval_fraction must be in [0, 1) (got {d.eval_fraction!r})"))
    for key, value in (("train.weight_decay", t.weight_decay), ("train.max_grad_norm", t.max_grad_norm),
                       ("train.warmup_steps", t.warmup_steps), ("train.eval_every", t.eval_every),
                       ("train.save_every", t.save_every), ("train.keep_checkpoints", t.keep_checkpoints),
                       ("train.early_stopping_patience", t.early_stopping_patience)):
        if not math.isfinite(value) or value < 0:
            p.append((key, f"{key} must be >= 0 (got {value!r})"))
    if not math.isfinite(t.learning_rate):
        p.append(("train.learning_rate", f"train.learning_rate must be a finite number (got {t.learning_rate!r})"))
    if t.lora_plus_ratio is not None and (not math.isfinite(t.lora_plus_ratio) or t.lora_plus_ratio <= 0):
        p.append(("train.lora_plus_ratio", f"train.lora_plus_ratio must be > 0 (B's learning rate is learning_rate "
                                           f"times it; LoRA+ suggests 16), got {t.lora_plus_ratio!r}"))
    if t.distributed not in ("ddp", "fsdp"):
        p.append(("train.distributed", f"train.distributed must be ddp or fsdp (got {t.distributed!r})"))
    elif t.distributed == "fsdp" and lo.quantize != "none":
        p.append(("train.distributed", f"train.distributed=fsdp cannot shard a quantized base (lora.quantize="
                                       f"{lo.quantize}: bitsandbytes weights are not FSDP2 parameters); QLoRA "
                                       "bases train with train.distributed=ddp"))
    if not math.isfinite(t.distributed_timeout) or t.distributed_timeout <= 0:
        p.append(("train.distributed_timeout", f"train.distributed_timeout must be > 0 seconds "
                                               f"(got {t.distributed_timeout!r})"))
    p += _device_problems(t.device)
    return p


def _device_problems(device: str) -> list[tuple[str, str]]:
    if device == "auto":
        return []
    try:
        import torch
        torch.device(device)
    except (RuntimeError, ValueError):
        return [("train.device", f"train.device {device!r} is not a device: use auto, cpu, cuda or cuda:N")]
    return []


def _lora_fields(cfg: RunConfig, base_model_name: str | None = None) -> dict:
    lo = cfg.lora
    return dict(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=lo.target_modules,
                use_dora=lo.variant == "dora", lora_fa=lo.variant == "lora_fa", use_rslora=lo.rslora,
                velora_config=VeloraConfig() if lo.variant == "velora" else None,
                init_lora_weights=lo.init, modules_to_save=lo.modules_to_save, task_type="CAUSAL_LM",
                trainable_token_indices=lo.trainable_token_indices,
                base_model_name_or_path=base_model_name or cfg.model)


def lora_config(cfg: RunConfig, base_model_name: str | None = None) -> LoraConfig:
    """The library's LoraConfig for this run (the one place run keys map to PEFT field names)."""
    return LoraConfig(**_lora_fields(cfg, base_model_name))
