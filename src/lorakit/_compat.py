"""Old import paths keep working: `import lorakit.checkpoint`, `from lorakit.runs import load_run`, ...

Before the package tree, lorakit was a flat set of modules. Each old module name maps to the new
module(s) that hold its public names. An old module that moved whole is the new module itself
(`lorakit.recompute is lorakit.layers.recompute`); one that was split (variants.py into DoRA, the
optimizers and the scaling rule) is a module object that looks each name up in the new ones, first hit
wins. Nothing is copied. New code imports the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

OLD_MODULES = {
    "lorakit.checkpoint": ("lorakit.adapters.files", "lorakit.atomic"),
    "lorakit.inject": ("lorakit.adapters.inject", "lorakit.models.heads"),
    "lorakit.routing": ("lorakit.adapters.rows", "lorakit.layers.mixed"),
    "lorakit.variants": ("lorakit.layers.dora", "lorakit.train.optim", "lorakit.config"),
    "lorakit.quant": ("lorakit.models.quantize", "lorakit.layers.bnb", "lorakit.adapters.quantize"),
    "lorakit.recompute": ("lorakit.layers.recompute",),
    "lorakit.arithmetic": ("lorakit.combine.arithmetic",),
    "lorakit.combine_dirs": ("lorakit.combine.folders",),
    "lorakit.records": ("lorakit.data.records",),
    "lorakit.batching": ("lorakit.data.batching",),
    "lorakit.attention": ("lorakit.models.attention",),
    "lorakit.losses": ("lorakit.eval.losses",),
    "lorakit.evaluate": ("lorakit.eval.generation", "lorakit.eval.perplexity", "lorakit.eval.drift"),
    "lorakit.runs": ("lorakit.train.config",),
    "lorakit.trainstate": ("lorakit.train.state",),
    "lorakit.metrics": ("lorakit.train.logbook",),
    "lorakit.inspect": ("lorakit.analysis.report",),
}


class _OldModule(types.ModuleType):
    """An old module name whose attributes are looked up in the new modules, first hit wins."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"lorakit's old module {name}: now {', '.join(targets)}")
        self.__targets = targets

    def __getattr__(self, attr: str):
        for target in self.__targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (now {', '.join(self.__targets)}) has no attribute {attr!r}")

    def __setattr__(self, attr: str, value) -> None:
        if attr.startswith("__") or attr.startswith("_OldModule__"):  # the module object's own
            return super().__setattr__(attr, value)
        for target in self.__targets:  # monkeypatching an old path patches the new module that holds the name
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return setattr(module, attr, value)
        return super().__setattr__(attr, value)

    def __dir__(self):
        return sorted({a for t in self.__targets for a in dir(importlib.import_module(t))})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in OLD_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        targets = OLD_MODULES[spec.name]
        if len(targets) == 1:  # the very module: patching either name patches both
            return importlib.import_module(targets[0])
        return _OldModule(spec.name, targets)

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
