"""Adapter inspection: what an adapter changes, layer by layer, without the base model.

For each module: r, scaling s, the update's Frobenius norm ||ΔW|| = ||s·B·A||, its singular values
and effective rank (Roy & Vetterli 2007: exp of the entropy of the normalised singular values, so a
rank-16 adapter that uses 3 directions scores about 3). Singular values of B·A come from the small
r×r core R_B·R_Aᵀ of two QR factorisations, never from the dense (out, in) matrix.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapters.files import PREFIX, parse_factor_key, read_adapter, refuse_non_finite
from ..config import LoraConfig
from . import figure


def singular_values(A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """Singular values of s·B·A (A (r, in), B (out, r)) through an r×r core."""
    _, ra = torch.linalg.qr(A.double().T)  # A^T = Q_A R_A, R_A (r, r)
    _, rb = torch.linalg.qr(B.double())  # B = Q_B R_B, R_B (r, r)
    return torch.linalg.svdvals(rb @ ra.T) * abs(s)


def effective_rank(sv: torch.Tensor) -> float:
    p = sv / sv.sum() if sv.sum() > 0 else sv
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum())) if len(p) else 0.0


def adapter_factors(directory: str | Path) -> tuple[LoraConfig, dict, dict[str, dict]]:
    """(config, all tensors, {module: {"A": (r, in), "B": (out, r)}}) of an adapter folder (finite checked)."""
    config, tensors = read_adapter(directory)
    refuse_non_finite(directory, tensors)
    factors: dict[str, dict] = {}
    for key, value in tensors.items():
        parsed = parse_factor_key(key.removeprefix(PREFIX))
        if parsed is not None and parsed[1] in ("A", "B"):
            factors.setdefault(parsed[0], {})[parsed[1]] = value
    return config, tensors, factors


def inspect_adapter(directory: str | Path) -> dict:
    """Per-module report of an adapter folder: r, scaling, ||ΔW||, effective rank, top singular values."""
    config, tensors, factors = adapter_factors(directory)
    rows = []
    for name in sorted(factors):
        A, B = factors[name]["A"], factors[name]["B"]
        s = config.scaling_for(name)
        sv = singular_values(A, B, s)
        rows.append({"module": name, "r": A.shape[0], "scaling": s, "shape": [B.shape[0], A.shape[1]],
                     "delta_norm": float(sv.pow(2).sum().sqrt()), "effective_rank": effective_rank(sv),
                     "top_singular_values": [round(float(x), 6) for x in sv[:4]]})
    params = sum(t.numel() for k, t in tensors.items() if ".lora_" in k)
    return {"config": config, "modules": rows, "parameters": params,
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values())}


def format_report(report: dict) -> str:
    cfg: LoraConfig = report["config"]
    lines = [f"adapter: r={cfg.r} alpha={cfg.lora_alpha} rslora={cfg.use_rslora} dora={cfg.use_dora} "
             f"base={cfg.base_model_name_or_path}",
             f"targets: {cfg.target_modules if isinstance(cfg.target_modules, str) else len(cfg.target_modules)} "
             f"-> {len(report['modules'])} modules, {report['parameters']:,d} parameters, "
             f"{report['bytes'] / 2**20:.2f} MiB", "",
             f"{'module':60s} {'r':>3s} {'||dW||':>9s} {'eff.rank':>8s}"]
    for row in report["modules"]:
        lines.append(f"{row['module'][-60:]:60s} {row['r']:3d} {row['delta_norm']:9.4f} {row['effective_rank']:8.2f}")
    return "\n".join(lines)


def plot_report(report: dict, png: str | Path) -> Path:
    """Bar chart of ||ΔW|| per module, coloured by effective rank."""
    plt = figure.pyplot(png)
    rows = report["modules"]
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.12), 4), dpi=110)
    ranks = [r["effective_rank"] for r in rows]
    top = max(max(ranks, default=1), 1)
    colours = plt.cm.viridis([x / top for x in ranks])
    ax.bar(range(len(rows)), [r["delta_norm"] for r in rows], color=colours)
    ax.set_xlabel("module (model order)")
    ax.set_ylabel("||ΔW|| (Frobenius)")
    ax.set_title("adapter update norm per module (colour: effective rank)")
    sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(0, top))
    fig.colorbar(sm, ax=ax, label="effective rank")
    return figure.save(fig, png)



