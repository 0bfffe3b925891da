"""lorakit inspect ADAPTER_DIR [--png FILE] [--json]: per-layer update norms and effective ranks."""

from __future__ import annotations

import json
from pathlib import Path


def add(sub) -> None:
    i = sub.add_parser("inspect", help="per-layer update norms and effective ranks of an adapter")
    i.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    i.add_argument("--png", help="where to write the plot (default: ADAPTER/inspect.png)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from ..analysis.report import format_report, inspect_adapter, plot_report
    report = inspect_adapter(args.adapter)
    png = plot_report(report, args.png or Path(args.adapter) / "inspect.png")
    if args.json:
        report["config"] = report["config"].to_dict()
        print(json.dumps(report))
    else:
        print(format_report(report))
        print(f"\nplot: {png}")
    return 0
