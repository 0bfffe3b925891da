"""Analysis of adapters: what an adapter changes, layer by layer.

    report.py      per-module ||ΔW||, effective rank and top singular values of an adapter folder; plot
    fastfood.py    the Fastfood random projection P (never dense), its adjoint as backward
    projection.py  a model's tensors (the adapter's or all) trained as θ0 + P·θd
    intrinsic.py   intrinsic dimension: the metric for several d, d90, plot, resumable summary
    subspace.py    subspace similarity φ(i, j) of two adapters (LoRA paper §7), table and heat map
    sweep.py       grids of ordinary training runs (product of --set lists), resumable; table, plot
    figure.py      the plots' shared frame (Agg backend, folder check, save and close)
"""

from .report import effective_rank, format_report, inspect_adapter, plot_report, singular_values

__all__ = ["effective_rank", "format_report", "inspect_adapter", "plot_report", "singular_values"]
