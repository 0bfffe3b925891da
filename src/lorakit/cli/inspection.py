"""lorakit inspect ADAPTER_DIR [--compare OTHER_DIR] [--png FILE] [--json]: per-layer update norms and
effective ranks; with --compare, the subspace similarity φ(i, j) of the two adapters (LoRA paper §7)."""

from __future__ import annotations

import json
from pathlib import Path


def add(sub) -> None:
    i = sub.add_parser("inspect", help="per-layer update norms and effective ranks of an adapter; --compare: "
                                       "subspace similarity of two adapters")
    i.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    i.add_argument("--compare", metavar="OTHER", help="a second adapter folder (another rank or seed): φ(i, j) "
                                                      "per module, a table and a heat map")
    i.add_argument("--png", help="where to write the plot (default: ADAPTER/inspect.png, or "
                                 "ADAPTER/compare.png with --compare)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    if args.compare:
        return _compare(args)
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


def _compare(args) -> int:
    from ..analysis.subspace import compare_adapters, format_comparison, plot_comparison
    result = compare_adapters(args.adapter, args.compare)
    png = plot_comparison(result, args.png or Path(args.adapter) / "compare.png")
    print(json.dumps(result) if args.json else f"{format_comparison(result)}\n\nheat map: {png}")
    return 0
