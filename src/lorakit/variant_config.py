"""The settings of PEFT's rarer LoRA variants, and the checks that keep one variant per adapter.

BdLoraConfig (use_bdlora), VeloraConfig (velora_config) and MonteCLoRA's defaults (monteclora_config) in
PEFT's fields and defaults; KaSA's (kasa_config) and trainable tokens' (trainable_token_indices) checks.
LoraConfig (config.py) holds them and calls these checks with itself (typed Any here: config.py is the
floor above); the variant objects are in layers/, chosen by
adapters/variants.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .errors import LorakitError


@dataclass
class BdLoraConfig:
    """PEFT's BD-LoRA settings (LoraConfig.use_bdlora): which targets get a block-diagonal A or B.

    A pattern matches a target when it is a substring of the module's full name (PEFT's rule). nblocks:
    blocks per block-diagonal factor (it divides r and the factor's other side). match_strict: every target
    must match one of the lists.
    """

    target_modules_bd_a: list[str] | None = None
    target_modules_bd_b: list[str] | None = None
    nblocks: int = 1
    match_strict: bool = True

    def __post_init__(self):
        LorakitError.collect(bdlora_problems(self), "Invalid BdLoraConfig:")

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """From a dict (adapter_config.json) or any object with these fields (PEFT's own BdLoraConfig);
        anything else is returned as it is (LoraConfig's validation names it)."""
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(value, cls) or not (isinstance(value, dict) or all(hasattr(value, n) for n in names)):
            return value
        if not isinstance(value, dict):
            value = {n: getattr(value, n) for n in names}
        return cls(**{f.name: value[f.name] for f in dataclasses.fields(cls) if f.name in value})


def bdlora_problems(bd: BdLoraConfig) -> list[str]:
    p = [f"BdLoraConfig.{name} must be a list of module name parts (got {v!r})"
         for name in ("target_modules_bd_a", "target_modules_bd_b") if (v := getattr(bd, name)) is not None
         and not (isinstance(v, (list, tuple, set)) and all(isinstance(t, str) for t in v))]
    if not isinstance(bd.nblocks, int) or isinstance(bd.nblocks, bool) or bd.nblocks <= 0:
        p.append(f"BdLoraConfig.nblocks must be a positive integer (got {bd.nblocks!r})")
    if not p and set(bd.target_modules_bd_a or []) & set(bd.target_modules_bd_b or []):
        p.append(f"BdLoraConfig: {sorted(set(bd.target_modules_bd_a) & set(bd.target_modules_bd_b))} are in both "
                 "target_modules_bd_a and target_modules_bd_b; a module's A or B is block-diagonal, not both")
    return p


@dataclass
class VeloraConfig:
    """PEFT's VeloraConfig (LoraConfig.velora_config): VeLoRA keeps A's input compressed for its backward.

    num_groups: sub-tokens per token (each kept as one number); scale: applied to the rebuilt input;
    init_type: how the projection vector is set, "batch_average" | "batch_average_once" | "random"
    (layers/velora.py). Written to adapter_config.json as a dict, as PEFT writes it.
    """

    num_groups: int = 64
    scale: float = 1.0
    init_type: str = "batch_average"

    def __post_init__(self) -> None:
        p = []
        if not isinstance(self.num_groups, int) or isinstance(self.num_groups, bool) or self.num_groups <= 0:
            p.append(f"num_groups must be a positive integer (got {self.num_groups!r})")
        if not is_number(self.scale) or self.scale <= 0:
            p.append(f"scale must be > 0 (got {self.scale!r})")
        if self.init_type not in ("batch_average", "batch_average_once", "random"):
            p.append(f"init_type must be 'batch_average', 'batch_average_once' or 'random' (got {self.init_type!r})")
        LorakitError.collect([f"velora_config: {m}" for m in p], "Invalid VeloraConfig:")

    @classmethod
    def coerce(cls, value: Any) -> Any:
        """A VeloraConfig from a dict (adapter_config.json) or an object with its fields (PEFT's); others as given."""
        if value is None or isinstance(value, cls):
            return value
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(value, dict):
            unknown = sorted(set(value) - set(names))
            if unknown:
                raise LorakitError(f"velora_config: unknown field(s) {unknown}; VeloraConfig has {names}")
            return cls(**value)
        if all(hasattr(value, n) for n in names):
            return cls(**{n: getattr(value, n) for n in names})
        return value


# PEFT's MontecloraConfig fields and defaults (monteclora_config is kept as this dict, written as it is)
MONTECLORA_DEFAULTS = {"num_samples": 8, "use_entropy": False, "dirichlet_prior": 0.1, "sample_scaler": 1e-4,
                       "kl_loss_weight": 1e-5, "buffer_size": 150}


def monteclora_problems(value: Any) -> list[str]:
    if not isinstance(value, dict):
        return [f"monteclora_config must be a MontecloraConfig or a dict of its fields (got {value!r})"]
    p = [f"monteclora_config has no field {k!r}; its fields are {sorted(MONTECLORA_DEFAULTS)}"
         for k in value if k not in MONTECLORA_DEFAULTS]
    for k in ("num_samples", "buffer_size"):
        if not isinstance(value.get(k), int) or isinstance(value.get(k), bool) or value.get(k) <= 0:
            p.append(f"monteclora_config.{k} must be a positive integer (got {value.get(k)!r})")
    return p  # with another variant: variant_problems


def is_number(x) -> bool:
    """A real number (int or float, not a bool) that is finite."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def variant_problems(config: Any) -> list[tuple[str, str]]:
    """At most one variant per adapter, as PEFT ("Invalid or unsupported variant combination")."""
    bd = config.use_bdlora
    if bd is not None and not isinstance(bd, BdLoraConfig):
        return [("use_bdlora", f"use_bdlora must be a BdLoraConfig (or its dict form) or None (got {bd!r})")]
    on = [name for name, flag in (("use_dora", config.use_dora is True), ("use_bdlora", bd is not None),
                                  ("init_lora_weights='mica'", config.init_lora_weights == "mica"),
                                  ("kasa_config", config.kasa_config is not None),
                                  ("velora_config", config.velora_config is not None),
                                  ("monteclora_config", config.monteclora_config is not None)) if flag]
    p = [(on[1], f"{' and '.join(on)} cannot be combined (PEFT has no such variant); choose one")
         ] if len(on) > 1 else []
    if bd is not None and config.lora_bias is True:
        p.append(("lora_bias", "use_bdlora cannot be combined with lora_bias=True in lorakit; set lora_bias=False"))
    if config.init_lora_weights == "mica" and config.lora_fa is True:
        p.append(("lora_fa", "init_lora_weights='mica' trains A only (B is frozen) and lora_fa freezes A: nothing "
                  "would train; drop lora_fa"))
    return p


def token_indices_problems(spec) -> list[str]:
    """trainable_token_indices: None, a list of token ids (rows of the input embedding), or {module: [ids]}."""
    ids = lambda v: isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)  # noqa: E731
                                                         and i >= 0 for i in v)
    if spec is None or ids(spec) or (isinstance(spec, dict) and all(isinstance(k, str) and ids(v)
                                                                     for k, v in spec.items())):
        return []
    return [f"trainable_token_indices must be a list of token ids (non-negative ints) or a dict "
            f"{{module name: [ids]}}, e.g. [32000, 32001] or {{'embed_tokens': [32000]}} (got {spec!r})"]


def kasa_problems(config: Any) -> list[str]:
    """kasa_config: None or {"beta": >= 0, "gamma": >= 0}; KaSA is a variant of its own (PEFT's combinations)."""
    kasa = config.kasa_config
    if kasa is None:
        return []
    if not isinstance(kasa, dict) or set(kasa) - {"beta", "gamma"}:
        return [f"kasa_config must be a KasaConfig or a dict with keys 'beta' and 'gamma' (got {kasa!r})"]
    p = [f"kasa_config {k} must be a number >= 0 (got {v!r})" for k, v in kasa.items() if not (is_number(v) and v >= 0)]
    others = [n for n, on in (("lora_fa", config.lora_fa is True),
                              ("lora_bias", config.lora_bias is True)) if on]
    if others:
        p.append(f"kasa_config cannot be combined with {', '.join(others)}; choose one variant")
    init = config.init_lora_weights
    if isinstance(init, str) and init != "gaussian":
        p.append(f"kasa_config cannot be combined with init_lora_weights={init!r} (KaSA truncates the base weight "
                 "itself); use True, False or 'gaussian'")
    return p
