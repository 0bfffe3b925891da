"""Analysis of adapters: what an adapter changes, layer by layer.

    report.py   per-module ||ΔW||, effective rank and top singular values of an adapter folder; plot
"""

from .report import effective_rank, format_report, inspect_adapter, plot_report, singular_values

__all__ = ["effective_rank", "format_report", "inspect_adapter", "plot_report", "singular_values"]
