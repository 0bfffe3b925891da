"""Adapter folders for the page: which there are, and their reports as JSON.

Two sources, each a folder the page was started with: "adapters" (--adapters DIR: each subfolder
with adapter_config.json, as `lorakit serve` offers them) and "runs" (--runs DIR: each run folder that
holds its final adapter). An adapter is named "SOURCE:RELATIVE/PATH" ("adapters:a3",
"runs:sweep/r=4"); paths are kept inside their folder (folders.inside).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..analysis.report import inspect_adapter
from ..analysis.subspace import compare_adapters, mean_grid
from ..errors import LorakitError
from .folders import Missing, Refused, contained, inside
from .runs import find_runs

CONFIG = "adapter_config.json"


def list_adapters(roots: dict[str, Path | None]) -> list[dict]:
    """[{id, source, name, r, lora_alpha, target_modules, base}] of both sources."""
    out = []
    if roots.get("adapters") is not None:
        root = Path(roots["adapters"])
        if not root.is_dir():
            raise LorakitError(f"--adapters {str(root)!r} is not a folder")
        for sub in sorted(root.iterdir()):
            if (sub / CONFIG).is_file() and contained(root, sub):
                out.append(_card("adapters", sub.name, sub))
    if roots.get("runs") is not None:
        root = Path(roots["runs"])
        for run in find_runs(root):
            folder = root / run["id"]
            if (folder / CONFIG).is_file():
                out.append(_card("runs", run["id"], folder))
    return out


def _card(source: str, rel: str, folder: Path) -> dict:
    card = {"id": f"{source}:{rel}", "source": source, "name": rel}
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        return {**card, "problem": f"{CONFIG} is unreadable: {e}"}
    if not isinstance(config, dict):
        return {**card, "problem": f"{CONFIG} is not a JSON object"}
    targets = config.get("target_modules")
    return {**card, "r": config.get("r"), "lora_alpha": config.get("lora_alpha"),
            "target_modules": targets if isinstance(targets, (str, list)) else None,
            "use_dora": config.get("use_dora"), "base": config.get("base_model_name_or_path")}


def adapter_folder(roots: dict[str, Path | None], adapter_id: str) -> Path:
    source, sep, rel = adapter_id.partition(":") if isinstance(adapter_id, str) else ("", "", "")
    if not sep or source not in ("adapters", "runs"):
        raise Refused(f"adapter {adapter_id!r} must be 'adapters:NAME' or 'runs:RUN' (as /ui/api/adapters lists)")
    if roots.get(source) is None:
        raise Missing(f"adapter {adapter_id!r}: the page was started without --{source} DIR")
    folder = inside(Path(roots[source]), rel, "adapter")
    if not (folder / CONFIG).is_file():
        raise Missing(f"adapter {adapter_id!r} is not an adapter folder (no {CONFIG} in it)")
    return folder


def report(roots: dict[str, Path | None], adapter_id: str) -> dict:
    """The inspection report (per module: r, scaling, ||ΔW||, effective rank, top singular values)."""
    result = inspect_adapter(adapter_folder(roots, adapter_id))
    result["config"] = result["config"].to_dict()
    return {"id": adapter_id, **result}


def similarity(roots: dict[str, Path | None], first: str, second: str) -> dict:
    """Subspace similarity φ(i, j) of two adapters, per module and averaged (the mean grid)."""
    result = compare_adapters(adapter_folder(roots, first), adapter_folder(roots, second))
    shapes = {(m["r1"], m["r2"]) for m in result["modules"]}
    mean = mean_grid(result).tolist() if len(shapes) == 1 else None  # rank patterns: no common grid
    result.update(first=first, second=second, mean=mean and [[round(float(x), 6) for x in row] for row in mean])
    return result
