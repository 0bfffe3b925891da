"""The package tree is the architecture: imports point down the floors only, and never run in a circle.

Floors, from the ground up (README, Layout). A module may import modules of lower floors, and modules of
its own package; the layer package (the LoRA math) imports nothing of lorakit but lorakit.errors, and
no third-party package but torch (and, lazily, bitsandbytes and gptqmodel for their base kinds). Checked
twice: by reading every import statement of the source (function bodies included), and by importing each
package in a fresh interpreter with lorakit's own __init__ left out, then listing what got loaded.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "lorakit"
FLOORS = [
    ["lorakit.errors"],
    ["lorakit.atomic", "lorakit._compat", "lorakit.variant_config"],
    ["lorakit.config", "lorakit.layers"],
    ["lorakit.models", "lorakit.data"],
    ["lorakit.adapters"],
    ["lorakit.combine", "lorakit.eval"],
    ["lorakit.train"],
    ["lorakit.analysis", "lorakit.peft_compat", "lorakit.demo", "lorakit.export", "lorakit.serve"],
    ["lorakit.ui"],
    ["lorakit.cli"],
    ["lorakit", "lorakit.__main__"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def floor_of(module: str) -> int:
    """The floor of a module: the floor of its longest listed prefix."""
    best = None
    for level, names in enumerate(FLOORS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > len(best[1])):
                best = (level, name)
    assert best is not None, f"{module} is on no floor: add it to FLOORS (and to the README's Layout)"
    return best[0]


def group_of(module: str) -> str:
    """The package a module belongs to for the same-floor rule (lorakit.layers.dora -> lorakit.layers)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def imports_of(module: str) -> set[str]:
    """The lorakit modules `module` imports, anywhere in its source (function bodies included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lorakit"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "lorakit":
                continue
            for alias in node.names:  # `from .. import eval` imports the submodule lorakit.eval
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES} - {module}


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_is_on_a_floor():
    for module in MODULES:
        floor_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    here = floor_of(module)
    wrong = [m for m in sorted(GRAPH[module]) if floor_of(m) > here
             or (floor_of(m) == here and group_of(m) != group_of(module))]
    assert not wrong, f"{module} (floor {here}) imports {[(m, floor_of(m)) for m in wrong]}"


def test_no_import_circles():
    """Tarjan's strongly connected components over the module graph: every component is one module."""
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_layer_package_stands_on_torch_and_errors_alone():
    for module in (m for m in MODULES if m.startswith("lorakit.layers")):
        outside = {m for m in GRAPH[module] if not m.startswith("lorakit.layers") and m != "lorakit.errors"}
        assert not outside, f"{module} imports {outside}"
        tree = ast.parse(MODULES[module].read_text())
        third = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        third |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                  and not n.level}
        assert third - set(sys.stdlib_module_names) <= {"torch", "bitsandbytes", "gptqmodel"}, (module, third)


_LOADED = """
import importlib, json, sys, types
root = types.ModuleType("lorakit")  # lorakit/__init__.py (which imports everything) is left out
root.__path__ = [sys.argv[1]]
sys.modules["lorakit"] = root
importlib.import_module(sys.argv[2])
print(json.dumps(sorted(m for m in sys.modules if m.startswith("lorakit.") or m == "transformers")))
"""


@pytest.mark.parametrize("package", ["lorakit.layers", "lorakit.data", "lorakit.models", "lorakit.adapters",
                                     "lorakit.combine", "lorakit.eval", "lorakit.train"])
def test_importing_a_package_loads_only_lower_floors(package):
    out = subprocess.run([sys.executable, "-c", _LOADED, str(PACKAGE), package], capture_output=True, text=True,
                         check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    above = [m for m in loaded if m != "transformers" and floor_of(m) > floor_of(package)]
    assert not above, f"importing {package} loaded {above}"
    if package == "lorakit.layers":
        assert all(m.startswith("lorakit.layers") or m == "lorakit.errors" for m in loaded), loaded
        assert "transformers" not in loaded


def test_old_module_paths_still_import():
    """Users' imports from before the tree (lorakit.checkpoint, lorakit.runs, ...) keep working."""
    from lorakit._compat import OLD_MODULES
    code = "; ".join(f"import {m}" for m in OLD_MODULES) + "; from lorakit.layers import LoraLayer, _LoraLinear; " \
        "from lorakit.runs import load_run; from lorakit.checkpoint import save_adapter, atomic_write; " \
        "from lorakit.variants import lora_scaling, lora_plus_optimizer, dora_weight_norm; " \
        "import lorakit.recompute, lorakit.layers.recompute; assert lorakit.recompute is lorakit.layers.recompute"
    subprocess.run([sys.executable, "-c", code], check=True)
