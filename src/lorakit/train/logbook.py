"""The run's logbook: metrics.jsonl (one JSON object per line, appended and flushed) and PNG curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..atomic import atomic_write_text


class MetricsLog:
    """Appends {"step": ..., ...} rows to output_dir/metrics.jsonl; a resumed run keeps appending.

    A resumed run drops the rows logged after its checkpoint (so the log has no duplicates), by writing
    the kept rows to a new file that replaces the old one atomically: a kill during that rewrite leaves
    the old log. A row torn by a kill mid-write (the last line) is dropped when the log is read.
    """

    def __init__(self, path: str | Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        if truncate_after_step is not None and self.path.exists():
            rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))
        elif truncate_after_step is None and self.path.exists():
            self.path.unlink()
        self._file = self.path.open("a")

    def write(self, **row) -> None:
        self._file.write(json.dumps({k: _plain(v) for k, v in row.items()}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    return round(v, 6) if isinstance(v, float) and math.isfinite(v) else v


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; lines that are not a JSON object (a row torn by a kill) are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_curves(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Training loss (and eval loss when present) against the step, as a PNG."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="#d62728")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title or "lorakit training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
