"""Find the modules a config targets, wrap them with LoraLayer, freeze the rest, and unwrap.

Matching follows PEFT: a list entry matches a module whose full name equals it or ends with
"." + entry; a string is a regex that must match the full name; "all-linear" means every linear
layer but the output head. exclude_modules uses the same rules; modules_to_save are never targeted.
When nothing matches, the error lists the closest module names so the fix is obvious.
"""

from __future__ import annotations

import copy
import difflib
import re

from torch import nn

from ..config import ALL_LINEAR, LoraConfig, pattern_key
from ..errors import LorakitError
from ..layers import LoraLayer, ParamKind, RowPlan, current_row_plan, kind_of, module_rows_forward
from ..models.heads import output_head_name
from ..models.targets import default_targets, model_type
from .trainable_tokens import TokenWrapper


def _matches(spec, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name in spec or any(name.endswith(f".{t}") for t in spec)


def _layer_index_ok(config: LoraConfig, name: str) -> bool:
    wanted = config.layers_to_transform
    if wanted is None or wanted == []:
        return True
    patterns = config.layers_pattern
    if not patterns:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)  # the first numbered segment
    else:
        m = None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m:
                break
    if not m:
        return False
    idx = int(m.group("idx"))
    return idx == wanted if isinstance(wanted, int) else idx in wanted


def layer_kind(module: nn.Module) -> str | None:
    """The layer's family ('linear' | 'conv1d' | 'embedding' | 'conv'), looking through a LoraLayer (already
    wrapped modules take more adapters); None for a module LoRA cannot wrap."""
    if isinstance(module, LoraLayer):
        return module.kind
    kind = kind_of(module)
    return kind.family if kind is not None else None


def _inside_wrapper(name: str) -> bool:
    """True for the parts of a wrapper (its base layer, adapter weights, saved copies), never targets."""
    return any(part in f"{name}." for part in (".base_layer.", ".lora_", ".modules_to_save.", ".original_module.",
                                                       ".token_adapter."))


def expand_all_linear(model: nn.Module) -> list[str]:
    """'all-linear' as PEFT expands it: the last name part of every linear layer but the output head."""
    head = output_head_name(model)
    names = {name.split(".")[-1] for name, mod in model.named_modules()
             if layer_kind(mod) in ("linear", "conv1d") and name != head and not _inside_wrapper(name)}
    if head is not None:
        names.discard(head.split(".")[-1])
    return sorted(names)


def resolve_targets(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """The config with target_modules=None replaced by the architecture's default (PEFT's rule)."""
    if config.target_modules is not None or config.target_parameters:  # PEFT: parameters only, then
        return config
    found = default_targets(model)
    if found is None:
        kind = model_type(model)
        what = f"model_type {kind!r}" if kind else f"a {type(model).__name__} (not a transformers model)"
        raise LorakitError(f"Please specify `target_modules` in `peft_config`: lorakit has no default target "
                           f"modules for {what}; name the layers, e.g. target_modules=['q_proj', 'v_proj'], a "
                           "regex, or 'all-linear'")
    return config.replace(target_modules=found)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules to wrap, in model order. Raises one error listing every problem."""
    spec = resolve_targets(model, config).target_modules
    if spec is None:  # target_parameters only
        return []
    if spec == ALL_LINEAR:
        spec = expand_all_linear(model)
    saved = config.modules_to_save or []
    found, problems = [], []
    for name, mod in model.named_modules():
        if isinstance(mod, (ModulesToSave, TokenWrapper)) or _inside_wrapper(name):
            continue
        if config.exclude_modules and _matches(config.exclude_modules, name):
            continue
        if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in saved):
            continue
        if not _matches(spec, name) or not _layer_index_ok(config, name):
            continue
        if layer_kind(mod) is None:
            problems.append(f"module {name!r} ({type(mod).__name__}) matches target_modules but is not a "
                            f"supported layer type; target its linear sub-layers instead")
            continue
        found.append(name)
    if not found and not problems:
        problems.append(_no_match_message(model, spec))
    problems += _unused_pattern_keys(config, found)
    LorakitError.collect(problems, "The LoRA config does not fit this model:")
    return found


def find_parameter_targets(model: nn.Module, config: LoraConfig, modules: list[str]) -> list[tuple[str, str]]:
    """(module name, parameter name) for each target_parameters entry: a parameter's full name equals it or
    ends with '.' + it (PEFT's rule), in model order. Raises one error listing every problem."""
    wanted = config.target_parameters or []
    found, used, problems = [], set(), []
    for name, mod in model.named_modules():
        if isinstance(mod, ModulesToSave) or _inside_wrapper(name):
            continue
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            hits = [w for w in wanted if full == w or full.endswith("." + w)]
            if not hits:
                continue
            used.update(hits)
            if name in modules or any(m == name for m, _ in found):
                problems.append(f"target_parameters {hits[0]!r}: module {name!r} is adapted already (by "
                                "target_modules or another of its parameters); lorakit adapts one thing per module")
            else:
                found.append((name, pname))
    problems += [f"target_parameters entry {w!r} matches no parameter of {type(model).__name__}"
                 for w in wanted if w not in used]
    LorakitError.collect(problems, "The LoRA config does not fit this model:")
    return found


def _no_match_message(model: nn.Module, spec) -> str:
    leaf_names = sorted({n.split(".")[-1] for n, m in model.named_modules()
                         if layer_kind(m) and not _inside_wrapper(n)})
    wanted = [spec] if isinstance(spec, str) else list(spec)
    close = sorted({c for w in wanted for c in difflib.get_close_matches(w.split(".")[-1], leaf_names, n=3)})
    hint = f" Closest module names: {close}." if close else ""
    return (f"target_modules={spec!r} matched no module of {type(model).__name__}.{hint} "
            f"Layers that can take LoRA: {leaf_names[:20]}")


def _unused_pattern_keys(config: LoraConfig, targets: list[str]) -> list[str]:
    problems = []
    for field_name in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, field_name)
        used = {pattern_key(patterns, t) for t in targets}
        problems += [f"{field_name} key {k!r} matches none of the targeted modules" for k in patterns
                     if k not in used]
    return problems


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def wrap(model: nn.Module, name: str, parameter: str | None = None) -> LoraLayer:
    """Replace module `name` by a LoraLayer around it (or return the existing one); with `parameter`, one
    that adapts that parameter of the module (target_parameters)."""
    parent, child = _parent(model, name)
    module = getattr(parent, child)
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(module, ParamKind(parameter) if parameter is not None else None)
    setattr(parent, child, layer)
    return layer


class ModulesToSave(nn.Module):
    """A module trained in full next to the adapters (e.g. a classifier head): one copy per adapter.

    The names original_module / modules_to_save match PEFT's, so parameter counts and keys agree.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, name: str) -> None:
        """A copy for adapter `name`; set_adapter activates it (adding one does not, as in PEFT)."""
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[name] = copy_

    @property
    def active_adapters(self) -> list[str]:
        """PEFT's attribute: the adapter whose copy runs, as a list (empty: the original runs)."""
        return [self.active_adapter] if self.active_adapter is not None else []

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.original_module(*args, **kwargs)
        plan = current_row_plan()
        if isinstance(plan, RowPlan) and args:  # a mixed batch: each row its adapter's copy
            return module_rows_forward(plan, self.original_module, self.modules_to_save, *args, **kwargs)
        if self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. .weight or .out_features of the wrapped module, as PEFT allows
            return getattr(super().__getattr__("original_module"), name)


def wrap_modules_to_save(model: nn.Module, config: LoraConfig, adapter: str) -> None:
    problems = []
    for wanted in config.modules_to_save or []:
        names = [n for n, m in model.named_modules()
                 if re.match(rf"(^|.*\.){wanted}$", n) and not isinstance(m, ModulesToSave)
                 and ".modules_to_save." not in n and ".original_module" not in n]
        wrappers = [n for n, m in model.named_modules()
                    if isinstance(m, ModulesToSave) and re.match(rf"(^|.*\.){wanted}$", n)]
        optional_head = config.task_type in ("SEQ_CLS", "TOKEN_CLS") and wanted in ("classifier", "score")
        if not names and not wrappers and not optional_head:
            problems.append(f"modules_to_save entry {wanted!r} matches no module")
        for name in names:
            parent, child = _parent(model, name)
            setattr(parent, child, ModulesToSave(getattr(parent, child)))
            wrappers.append(name)
        for name in wrappers:
            model.get_submodule(name).add(adapter)
    LorakitError.collect(problems)


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every LoraLayer by its base layer, every ModulesToSave by its active copy and every trainable-tokens
    wrapper by its embedding (with merged rows, if merged)."""
    for name, mod in reversed(list(model.named_modules())):  # inner first: an attention's out_proj layer
        if isinstance(mod, LoraLayer):
            parent, child = _parent(model, name)
            setattr(parent, child, mod.base_layer)
        elif isinstance(mod, ModulesToSave):
            parent, child = _parent(model, name)
            keep = mod.modules_to_save[mod.active_adapter] if mod.active_adapter else mod.original_module
            setattr(parent, child, keep)
        elif isinstance(mod, TokenWrapper):
            parent, child = _parent(model, name)
            setattr(parent, child, mod.token_adapter.base_layer)
    return model
