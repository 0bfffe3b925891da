"""LoraConfig: PEFT's field names and defaults, validation, and the adapter_config.json form.

Every field PEFT 0.21 writes to ``adapter_config.json`` exists here with PEFT's default, so a PEFT file
loads and a file we write loads in PEFT. Fields for PEFT features lorakit does not implement are kept
for the file format; setting them to a non-default value is an error that says so. Checks that need
only the config run at construction; checks that need the model (which modules match) run in inject.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import LorakitError
from .variant_config import (MONTECLORA_DEFAULTS, BdLoraConfig, VeloraConfig, is_number, kasa_problems,
                             monteclora_problems, token_indices_problems, variant_problems)

CONFIG_NAME = "adapter_config.json"


class PeftType(str, enum.Enum):
    """PEFT's method names; lorakit implements LORA. A str: it equals "LORA" and is written as such."""
    LORA = "LORA"


class TaskType(str, enum.Enum):
    """PEFT's task types: a str enum, so TaskType.CAUSAL_LM == "CAUSAL_LM" and .value works as in PEFT."""
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


ALL_LINEAR = "all-linear"
_INIT_CHOICES = (True, False, "gaussian", "pissa", "mica")
_TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# PEFT fields whose features lorakit does not implement: (name, value that means "off").
_UNSUPPORTED_OFF = {
    "megatron_config": None, "eva_config": None, "corda_config": None,
    "lora_ga_config": None, "alora_invocation_tokens": None, "use_qalora": False,
    "layer_replication": None,
    "arrow_config": None, "runtime_config": None,
}


@dataclass(init=False)
class LoraConfig:
    """The configuration of one LoRA adapter, with PEFT's names and defaults.

    scaling s = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
    target_modules: a list (exact name or dotted suffix), a string (full-name regex) or "all-linear".
    lora_fa (ours): freeze A after init and train only B (LoRA-FA); not written to adapter_config.json.
    target_modules=None means "the default targets of this architecture" (models/targets.py), resolved
    when the adapter is added, as in PEFT.
    """

    # PEFT's read-only facts about the method (LoRA is neither prompt learning nor adaption prompt)
    is_prompt_learning = False
    is_adaption_prompt = False

    # PEFT bookkeeping
    task_type: str | None = None
    peft_type: str = "LORA"
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    # the LoRA method
    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: Any = None
    corda_config: Any = None
    lora_ga_config: Any = None
    use_dora: bool = False
    velora_config: Any = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: Any = None
    runtime_config: Any = None
    lora_bias: bool = False
    target_parameters: Any = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False
    # lorakit's own
    lora_fa: bool = False

    def __init__(self, **kwargs: Any) -> None:
        names = {f.name: f for f in dataclasses.fields(self)}
        unknown = [k for k in kwargs if k not in names]
        problems = [_unknown_field(k, names) for k in unknown]
        for name, f in names.items():
            if name in kwargs:
                value = kwargs[name]
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                value = f.default_factory()  # type: ignore[misc]
            else:
                value = f.default
            setattr(self, name, value)
        self._normalise()
        LorakitError.collect(problems + self.problems(), "Invalid LoraConfig:")

    # -- validation ------------------------------------------------------------------------------------

    def _normalise(self) -> None:
        self.velora_config = VeloraConfig.coerce(self.velora_config)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_parameters, (set, tuple)):
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.task_type, str) and self.task_type.upper() in TaskType.__members__:
            self.task_type = TaskType(self.task_type.upper())
        if isinstance(self.peft_type, str) and self.peft_type in PeftType.__members__:
            self.peft_type = PeftType(self.peft_type)
        if dataclasses.is_dataclass(self.kasa_config) and not isinstance(self.kasa_config, type):
            self.kasa_config = dataclasses.asdict(self.kasa_config)  # PEFT's KasaConfig -> its file form
        if isinstance(self.kasa_config, dict):
            self.kasa_config = {"beta": 1e-4, "gamma": 1e-3, **self.kasa_config}  # PEFT's defaults
        if self.use_bdlora is not None:
            self.use_bdlora = BdLoraConfig.coerce(self.use_bdlora)  # PEFT's BdLoraConfig or a dict from a file
        if dataclasses.is_dataclass(self.monteclora_config) and not isinstance(self.monteclora_config, type):
            self.monteclora_config = dataclasses.asdict(self.monteclora_config)  # PEFT's MontecloraConfig
        if isinstance(self.monteclora_config, dict):  # PEFT's fields and defaults; {} is off
            self.monteclora_config = ({**MONTECLORA_DEFAULTS, **self.monteclora_config}
                                      if self.monteclora_config else None)

    def problems(self) -> list[str]:
        """Every problem the config has on its own (no model needed)."""
        return [message for _, message in self.field_problems()]

    def field_problems(self) -> list[tuple[str, str]]:
        """(field, problem) for every problem the config has on its own; callers that read the values from
        somewhere else (a run config's lora.* keys) map the field to where it came from."""
        p = []
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            p.append(("r", f"r must be a positive integer (got {self.r!r}); typical values are 8, 16 or 32"))
        if not is_number(self.lora_alpha) or self.lora_alpha <= 0:
            p.append(("lora_alpha", f"lora_alpha must be > 0 (got {self.lora_alpha!r}); a common choice is 2*r"))
        if not is_number(self.lora_dropout) or not 0 <= self.lora_dropout < 1:
            p.append(("lora_dropout", f"lora_dropout must be in [0, 1) (got {self.lora_dropout!r})"))
        if self.bias not in ("none", "all", "lora_only"):
            p.append(("bias", f"bias must be 'none', 'all' or 'lora_only' (got {self.bias!r})"))
        p += [("target_modules", m) for m in _targets_problems("target_modules", self.target_modules)]
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            p.append(("layers_to_transform", "layers_to_transform cannot be used with a regex target_modules; put "
                      "the layer index in the regex (e.g. r'.*layers\\.1\\..*q_proj') or give target_modules as a list"))
        if self.layers_pattern and self.layers_to_transform is None:
            p.append(("layers_pattern", "layers_pattern is only used with layers_to_transform; set layers_to_transform too"))
        p += [("exclude_modules", m) for m in _targets_problems("exclude_modules", self.exclude_modules)]
        p += [("target_parameters", m) for m in _parameters_problems(self)]
        if self.modules_to_save is not None and not (isinstance(self.modules_to_save, list)
                                                     and all(isinstance(m, str) for m in self.modules_to_save)):
            p.append(("modules_to_save", f"modules_to_save must be a list of module names (got {self.modules_to_save!r})"))
        init = self.init_lora_weights
        if not (init in _INIT_CHOICES or (isinstance(init, str) and re.fullmatch(r"pissa_niter_\d+", init))):
            p.append(("init_lora_weights", f"init_lora_weights must be one of True, False, 'gaussian', 'mica', "
                      f"'pissa', 'pissa_niter_K' (got {init!r}); lorakit does not implement other PEFT initialisations"))
        if self.task_type not in _TASK_TYPES:
            p.append(("task_type", f"task_type {self.task_type!r} is unknown; use one of {[t for t in _TASK_TYPES if t]}"))
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                p.append(("rank_pattern", f"rank_pattern[{key!r}] must be a positive integer (got {value!r})"))
        for key, value in self.alpha_pattern.items():
            if not is_number(value) or value <= 0:
                p.append(("alpha_pattern", f"alpha_pattern[{key!r}] must be > 0 (got {value!r})"))
        if self.loftq_config:
            p.append(("loftq_config", "loftq_config is set, but lorakit does not implement LoftQ; remove it"))
        for name, off in _UNSUPPORTED_OFF.items():
            if getattr(self, name) not in (off, None, {}, []):
                p.append((name, f"{name}={getattr(self, name)!r}: this PEFT feature is not implemented by lorakit; "
                          f"leave it at {off!r}"))
        for name in ("use_dora", "use_rslora", "lora_fa", "fan_in_fan_out", "inference_mode", "lora_bias"):
            if not isinstance(getattr(self, name), bool):
                p.append((name, f"{name} must be true or false (got {getattr(self, name)!r})"))
        p += [("kasa_config", m) for m in kasa_problems(self)]
        p += [("trainable_token_indices", m) for m in token_indices_problems(self.trainable_token_indices)]
        if self.velora_config is not None and not isinstance(self.velora_config, VeloraConfig):
            p.append(("velora_config", f"velora_config must be a VeloraConfig, a dict of its fields, or None (got "
                      f"{self.velora_config!r})"))
        elif self.velora_config is not None and self.target_parameters:
            p.append(("velora_config", "velora_config cannot be combined with target_parameters (as in PEFT); "
                      "choose one"))
        if self.monteclora_config is not None:
            p += [("monteclora_config", m) for m in monteclora_problems(self.monteclora_config)]
        if self.use_dora is True and self.lora_fa is True:
            p.append(("use_dora", "use_dora and lora_fa cannot be combined; choose one variant"))
        p += [(name, m) for name, m in variant_problems(self)]
        return p

    # -- per-module values ---------------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """r for this module: the first rank_pattern key that matches its name's end, else r."""
        return self.rank_pattern.get(pattern_key(self.rank_pattern, module_name), self.r)

    def alpha_for(self, module_name: str) -> float:
        return self.alpha_pattern.get(pattern_key(self.alpha_pattern, module_name), self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        return lora_scaling(self.alpha_for(module_name), self.rank_for(module_name), self.use_rslora)

    # -- the file form -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """PEFT's adapter_config.json content (lorakit's own fields left out)."""
        # runtime_config is runtime-only in PEFT and never written; lora_fa is ours
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("lora_fa", "runtime_config")}
        d["inference_mode"] = True  # PEFT writes saved adapters in inference mode
        if isinstance(d["velora_config"], VeloraConfig):
            d["velora_config"] = dataclasses.asdict(d["velora_config"])
        d.update({k: d[k].value for k in ("task_type", "peft_type") if isinstance(d[k], enum.Enum)})
        if isinstance(d["use_bdlora"], BdLoraConfig):  # PEFT writes the nested config as a dict (asdict)
            d["use_bdlora"] = dataclasses.asdict(d["use_bdlora"])
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "LoraConfig":
        """Build from a PEFT adapter_config.json dict. Unknown keys from newer PEFT versions are ignored
        when they hold an 'off' value (null, false, empty), and are an error otherwise."""
        if d.get("peft_type") not in (None, "LORA"):
            raise LorakitError(f"{source}: peft_type is {d.get('peft_type')!r}; lorakit loads only LoRA adapters")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs, problems = {}, []
        for k, v in d.items():
            if k in names:
                kwargs[k] = v
            elif v not in (None, False, {}, [], ""):
                problems.append(f"{source}: field {k!r}={v!r} is not understood by lorakit")
        LorakitError.collect(problems)
        try:
            return cls(**kwargs)
        except LorakitError as e:
            raise LorakitError(f"{source}: {e}") from None

    def save(self, directory: str | Path) -> Path:
        """Write adapter_config.json into `directory` (atomically): the one writer of that file."""
        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_json_default) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "LoraConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise LorakitError(f"{path} not found: an adapter folder holds {CONFIG_NAME} and "
                               "adapter_model.safetensors (saved by lorakit or PEFT)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise LorakitError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise LorakitError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); an adapter_config.json is "
                               "written by lorakit or PEFT as UTF-8 JSON") from None
        if not isinstance(d, dict):
            raise LorakitError(f"{path}: holds a JSON {type(d).__name__}, not an object of LoRA fields ({{\"r\": 8, "
                               "...}); re-save the adapter with lorakit or PEFT")
        return cls.from_dict(d, source=str(path))

    def replace(self, **changes: Any) -> "LoraConfig":
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(changes)
        return LoraConfig(**d)


def lora_scaling(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha/r, or alpha/sqrt(r) for rsLoRA (Kalajdzievski 2023), which keeps updates stable at high r."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def pattern_key(patterns: dict, module_name: str) -> str:
    """PEFT's rule: the first key k with re.match(rf'(.*\\.)?({k})$', name); else the name itself."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name


def _unknown_field(name: str, known: dict) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown field {name!r}{hint}"


def _parameters_problems(config: "LoraConfig") -> list[str]:
    """target_parameters: a list of '<module>.<parameter>' names, without what PEFT's ParamWrapper refuses."""
    spec = config.target_parameters
    if spec is None or spec == []:
        return []
    if not (isinstance(spec, list) and all(isinstance(n, str) and "." in n for n in spec)):
        return [f"target_parameters must be a list of '<module>.<parameter>' names, e.g. ['lin0.weight'] "
                f"(got {spec!r})"]
    bad = [what for what, on in (("lora_dropout", config.lora_dropout), ("use_dora", config.use_dora is True),
                                 ("lora_bias", config.lora_bias is True), ("fan_in_fan_out", config.fan_in_fan_out is True))
           if on]
    return [f"target_parameters cannot be combined with {', '.join(bad)} (as in PEFT); turn {'them' if len(bad) > 1 else 'it'} "
            "off"] if bad else []


def _targets_problems(field_name: str, spec, required: bool = False) -> list[str]:
    """target_modules / exclude_modules: a list of names, a regex, or "all-linear" (None: the default)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        return _regex_problem(field_name, spec)
    if not isinstance(spec, list) or not all(isinstance(t, str) for t in spec):
        return [f"{field_name} must be a list of module names, a regex string, or 'all-linear' (got {spec!r})"]
    if not spec and required:
        return [f"{field_name} is empty: name at least one module, or use 'all-linear'"]
    return []


def _regex_problem(field_name: str, pattern: str) -> list[str]:
    if pattern == ALL_LINEAR:
        return []
    try:
        re.compile(pattern)
    except re.error as e:
        return [f"{field_name} {pattern!r} is not a valid regular expression ({e})"]
    return []


def _json_default(obj: Any) -> Any:
    if isinstance(obj, set):
        return sorted(obj)
    warnings.warn(f"adapter_config.json: {type(obj).__name__} written as a string")
    return str(obj)
