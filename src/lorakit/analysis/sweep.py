"""Sweeps: a grid of ordinary training runs, each a named run in its own folder, then a table and a plot.

    grid(["lora.r=1,2,4", "lora.target_modules=[q_proj,v_proj],all-linear"])
        -> the product of the lists: [{"lora.r": 1, "lora.target_modules": [...]}, ...]; a single value
           is a constant of every point; values are YAML, split on commas outside brackets
    run_sweep(config, sets, ...)
        each point: load_run(config, overrides = the point's keys) with output_dir OUT/<point name>,
        trained by recipe.train; OUT/<point>/sweep_point.json marks it finished (a rerun skips it;
        an interrupted one resumes from its checkpoint). A point that fails is recorded with its error and
        the others go on (a rerun retries it). OUT/sweep.json, OUT/sweep.md (the table) and OUT/sweep.png
        (the eval metric against trainable parameters and against wall time).
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import time
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_text
from ..data import load_records
from ..errors import LorakitError
from ..train import load_run, train
from ..train.state import latest_checkpoint
from . import figure


def split_values(text: str) -> list[str]:
    """'1,2,[a,b]' -> ['1', '2', '[a,b]']: commas inside brackets or braces belong to the value."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [v.strip() for v in out + [cur] if v.strip()]


def grid(sets: list[str]) -> list[dict[str, Any]]:
    """The points of a sweep: the product of every --set key's values, in the order given."""
    axes = []
    for item in sets:
        if "=" not in item:
            raise LorakitError(f"--set {item!r}: expected section.key=v1,v2,..., e.g. --set lora.r=1,2,4")
        key, values = item.split("=", 1)
        parsed = [yaml.safe_load(v) for v in split_values(values)]
        if not parsed:
            raise LorakitError(f"--set {item!r}: no values after '='")
        axes.append([(key.strip(), v) for v in parsed])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def point_name(point: dict[str, Any], varying: list[str]) -> str:
    """'r=4_target_modules=q_proj+v_proj' from the keys that vary (the last part of each key)."""
    parts = []
    for key in varying:
        value = point[key]
        text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{key.split('.')[-1]}={text}")
    return re.sub(r"[^A-Za-z0-9=+._-]", "_", "_".join(parts)) or "point"


def run_sweep(config: str | Path | None, sets: list[str], run: str | None = None, metric: str = "eval_loss",
              eval_limit: int | None = None, out: str | Path | None = None, progress: bool = True) -> dict:
    """Train every point not finished yet; returns {"points": [...], "failed": [...]} (also in OUT)."""
    points = grid(sets)
    varying = [k for k in (points[0] if points else {}) if len({json.dumps(p[k]) for p in points}) > 1]
    base = load_run(config, run, [f"{k}={json.dumps(v)}" for k, v in points[0].items()])
    if metric not in ("eval_loss", "exact_match"):
        raise LorakitError(f"--metric {metric!r}: expected eval_loss or exact_match")
    if not (base.data.eval or base.data.eval_fraction):
        raise LorakitError("a sweep compares eval metrics: set data.eval (a file) or data.eval_fraction")
    out = Path(out or Path(base.output_dir) / "sweep")
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    for point in points:
        name = point_name(point, varying)
        overrides = [f"{k}={json.dumps(v)}" for k, v in point.items()] + [f"output_dir={out / name}", f"name={name}"]
        _say(progress, f"lorakit sweep: {name} ...")
        try:
            rows.append(_point(load_run(config, run, overrides), point, name, metric, eval_limit, progress))
        except Exception as e:  # noqa: BLE001 - one failing point must not stop the others
            failed.append({"name": name, "point": point, "error": f"{type(e).__name__}: {e}"})
            _say(progress, f"lorakit sweep: {name} failed: {type(e).__name__}: {e}")
    summary = {"metric": metric, "varying": varying, "points": rows, "failed": failed}
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out / "sweep.md", format_table(summary) + "\n")
    if rows:
        plot(summary, out / "sweep.png")
    return summary


def _point(cfg, point: dict, name: str, metric: str, eval_limit: int | None, progress: bool) -> dict:
    """Train one point (or read it back when finished); its row of the table."""
    folder = Path(cfg.output_dir)
    done = folder / "sweep_point.json"
    if done.is_file():
        _say(progress, f"lorakit sweep: {name} finished already")
        return json.loads(done.read_text())
    resume = latest_checkpoint(folder) is not None
    from ..models.load import load_model
    model, tokenizer = load_model(cfg.model)
    started = time.time()
    result = train(cfg, resume=resume, progress=progress, model=model, tokenizer=tokenizer, overwrite=not resume)
    row = {"name": name, "point": point, "output_dir": str(folder), "steps": result.steps,
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "seconds": round(time.time() - started, 1), "train_loss": result.train_loss, "eval_loss": result.eval_loss}
    if metric == "exact_match":
        from ..eval.generation import exact_match
        rows = load_records(cfg.data.eval) if cfg.data.eval else None
        if rows is None:
            raise LorakitError("--metric exact_match needs data.eval (a file of prompts and answers)")
        row["exact_match"] = exact_match(model, tokenizer, list(rows)[:eval_limit] if eval_limit else rows)["exact_match"]
    atomic_write_text(done, json.dumps(row, indent=2) + "\n")
    return copy.deepcopy(row)


def format_table(summary: dict) -> str:
    metric = summary["metric"]
    head = "| point | trainable params | wall s | train loss | eval loss |" + (" exact match |" if metric == "exact_match" else "")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in summary["points"]:
        cells = [r["name"], f"{r['trainable']:,d}", f"{r['seconds']:.0f}", f"{r['train_loss']:.4f}",
                 "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"]
        if metric == "exact_match":
            cells.append(f"{100 * r['exact_match']:.1f} %")
        lines.append("| " + " | ".join(cells) + " |")
    for f in summary["failed"]:
        lines.append(f"| {f['name']} | failed: {f['error'][:120]} |")
    return "\n".join(lines)


def plot(summary: dict, png: Path) -> Path:
    """The eval metric against trainable parameters (log x) and against wall time, one dot per point."""
    plt = figure.pyplot(png)
    key = "exact_match" if summary["metric"] == "exact_match" else "eval_loss"
    rows = [r for r in summary["points"] if r.get(key) is not None]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    for ax, x, label in ((axes[0], "trainable", "trainable parameters"), (axes[1], "seconds", "wall time (s)")):
        ax.scatter([r[x] for r in rows], [r[key] for r in rows])
        for r in rows:
            ax.annotate(r["name"], (r[x], r[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(key)
    axes[0].set_xscale("log")
    fig.suptitle("lorakit sweep", fontsize=9)
    return figure.save(fig, png)


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, flush=True)
