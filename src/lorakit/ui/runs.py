"""Run folders under a root (--runs DIR): what `lorakit train` left in each, read for the page.

A run folder holds run.yaml (the resolved config, written when a run starts or resumes) and/or
metrics.jsonl (one JSON row per logged step: loss, lr, tokens_per_s, ...; eval rows: eval_loss).
Runs are found by walking the root (symlinks out of it skipped, checkpoints/ and best/ not entered,
at most MAX_DEPTH folders down; a run folder's own subfolders are not searched for more runs).

Metrics are read from a byte offset so that a page following a live run fetches only the new rows:
only whole lines count (a row being written, or torn by a kill, waits for its newline), and the file's
identity (inode) tells the page when a resumed run rewrote the log so it must start over.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import yaml

from ..errors import LorakitError
from .folders import Missing, contained, inside

MAX_DEPTH = 4  # folders below the root searched for runs (runs/sweep/r=4 is depth 2)
MAX_RUNS = 500
LIVE_S = 120  # metrics written this recently (or within 3 mean steps), no final adapter yet: training
SKIP = {"checkpoints", "best", "__pycache__", ".git"}
MAX_READ = 8 << 20  # bytes of metrics.jsonl one request reads; the page asks again for the rest


def is_run(folder: Path) -> bool:
    return (folder / "run.yaml").is_file() or (folder / "metrics.jsonl").is_file()


class Summaries:
    """Final figures per metrics.jsonl, reused while the file's (inode, size, mtime) is unchanged, so a
    page listing many runs every few seconds does not re-read the logs that did not change."""

    def __init__(self):
        self._entries: dict[Path, tuple[tuple, dict]] = {}

    def final(self, path: Path) -> dict:
        try:
            st = path.stat()
        except OSError:
            self._entries.pop(path, None)
            return final_metrics([])
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        hit = self._entries.get(path)
        if hit is None or hit[0] != key:
            hit = self._entries[path] = (key, final_metrics(_rows(path)))
        return hit[1]


def find_runs(root: Path, summaries: Summaries | None = None) -> list[dict]:
    """Summaries of every run folder under root, newest first."""
    root = Path(root)
    if not root.is_dir():
        raise LorakitError(f"--runs {str(root)!r} is not a folder; give the folder your runs are written to")
    found = []
    for folder in _walk(root, root, 0):
        found.append(summary(root, folder, summaries))
        if len(found) >= MAX_RUNS:
            break
    return sorted(found, key=lambda r: -r["modified"])


def _walk(root: Path, folder: Path, depth: int):
    try:
        subs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in SKIP)
    except OSError:
        return
    for sub in subs:
        if not contained(root, sub):
            continue
        if is_run(sub):
            yield sub
        elif depth + 1 < MAX_DEPTH:
            yield from _walk(root, sub, depth + 1)


def run_folder(root: Path, run_id: str) -> Path:
    folder = inside(root, run_id, "run")
    if not is_run(folder):
        raise Missing(f"run {run_id!r} is not a run folder (no run.yaml or metrics.jsonl in it)")
    return folder


def summary(root: Path, folder: Path, summaries: Summaries | None = None) -> dict:
    """Name, status and final figures of one run (its metrics.jsonl read whole, or reused from summaries)."""
    final = (summaries or Summaries()).final(folder / "metrics.jsonl")
    step_s = final["elapsed_s"] / final["steps"] if _num(final.get("elapsed_s")) and final["steps"] else 0.0
    status, modified = _status(folder, max(LIVE_S, 3 * step_s))
    return {"id": folder.relative_to(root).as_posix(), "name": folder.name, "status": status,
            "modified": modified, "final": final}


def read_run(root: Path, run_id: str) -> dict:
    """A run's summary with its resolved config (nested, and flat "train.learning_rate" keys)."""
    folder = run_folder(root, run_id)
    out = summary(Path(root).resolve(), folder)
    text = (folder / "run.yaml").read_text(errors="replace") if (folder / "run.yaml").is_file() else ""
    try:
        config = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as e:
        config = {"_unreadable": f"run.yaml is not valid YAML: {e}"}
    out.update(config=config if isinstance(config, dict) else {}, config_text=text,
               flat=_flatten(config if isinstance(config, dict) else {}),
               adapter=(folder / "adapter_model.safetensors").is_file())
    return out


def read_metrics_from(root: Path, run_id: str, offset: int = 0) -> dict:
    """The whole rows of metrics.jsonl from byte `offset`, the offset after them, and the file's identity."""
    path = run_folder(root, run_id) / "metrics.jsonl"
    if not path.is_file():
        return {"rows": [], "offset": 0, "file": None, "size": 0}
    with path.open("rb") as f:
        st = os.fstat(f.fileno())
        if offset > st.st_size:
            offset = 0  # the log was rewritten shorter (a resume): the page starts over
        f.seek(offset)
        data = f.read(MAX_READ)
    whole = data[: data.rfind(b"\n") + 1]  # a line without its newline is still being written
    return {"rows": _parse(whole.decode("utf-8", errors="replace")), "offset": offset + len(whole),
            "file": f"{st.st_dev}:{st.st_ino}", "size": st.st_size}


def final_metrics(rows: list[dict]) -> dict:
    """Last train loss, last / best eval loss, steps, tokens, elapsed seconds, mean tokens per second."""
    train = [r for r in rows if _num(r.get("loss"))]
    evals = [r for r in rows if _num(r.get("eval_loss"))]
    out: dict = {"steps": max((r.get("step", 0) for r in rows if isinstance(r.get("step"), int)), default=0)}
    if train:
        last = train[-1]
        out.update(loss=last["loss"], lr=last.get("lr"), tokens=last.get("tokens"), elapsed_s=last.get("elapsed_s"))
        if _num(last.get("tokens")) and _num(last.get("elapsed_s")) and last["elapsed_s"] > 0:
            out["tokens_per_s"] = last["tokens"] / last["elapsed_s"]
    if evals:
        out.update(eval_loss=evals[-1]["eval_loss"], best_eval_loss=min(r["eval_loss"] for r in evals),
                   eval_perplexity=evals[-1].get("eval_perplexity"))
    return out


def _status(folder: Path, live_s: float = LIVE_S) -> tuple[str, float]:
    """("finished" | "training" | "stopped", last modification time): finished when the final adapter is
    newer than run.yaml (written at each start and resume), training while metrics are fresher than live_s."""
    metrics, config, adapter = (folder / n for n in ("metrics.jsonl", "run.yaml", "adapter_model.safetensors"))
    times = [p.stat().st_mtime for p in (metrics, config, adapter) if p.is_file()]
    modified = max(times, default=0.0)
    if adapter.is_file() and (not config.is_file() or adapter.stat().st_mtime >= config.stat().st_mtime):
        return "finished", modified
    if metrics.is_file() and time.time() - metrics.stat().st_mtime < live_s:
        return "training", modified
    return "stopped", modified


def _rows(path: Path) -> list[dict]:
    return _parse(path.read_text(errors="replace")) if path.is_file() else []


def _parse(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn row
        if isinstance(row, dict):
            rows.append({k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in row.items()})
    return rows


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
