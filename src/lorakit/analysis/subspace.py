"""Subspace similarity of two adapters (Hu et al. 2021, LoRA §7), module by module.

    φ(1, 2, i, j) = ||V1[:, :i]ᵀ · V2[:, :j]||²_F / min(i, j)   in [0, 1]

V1, V2: the right singular vectors (in × r, by decreasing singular value) of each adapter's update
ΔW = s·B·A. They come from QR cores, never the dense (out, in) matrix: Aᵀ = Q_A R_A, B = Q_B R_B,
ΔW = s·Q_B (R_B R_Aᵀ) Q_Aᵀ, and the core's SVD C = U S Wᵀ gives V = Q_A W. φ = 1 when the top-i
directions of one lie inside the top-j of the other; for random r-dimensional subspaces of R^in it is
about max(i, j)/in.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import LorakitError
from . import figure
from .report import adapter_factors


def right_singular_vectors(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(in, r) right singular vectors of B·A (A (r, in), B (out, r)), columns by decreasing singular value."""
    qa, ra = torch.linalg.qr(A.double().T)  # (in, r), (r, r)
    _, rb = torch.linalg.qr(B.double())  # (r, r)
    _, _, wh = torch.linalg.svd(rb @ ra.T)
    return qa @ wh.T


def phi(v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """(r1, r2) grid: entry [i-1, j-1] = ||v1[:, :i]ᵀ v2[:, :j]||²_F / min(i, j)."""
    overlap = (v1.T @ v2).pow(2)  # (r1, r2): squared cosines between single directions
    cumulative = overlap.cumsum(0).cumsum(1)  # sum over the top-i x top-j block
    i = torch.arange(1, v1.shape[1] + 1, dtype=overlap.dtype)[:, None]
    j = torch.arange(1, v2.shape[1] + 1, dtype=overlap.dtype)[None, :]
    return cumulative / torch.minimum(i, j)


def compare_adapters(first: str | Path, second: str | Path) -> dict:
    """φ grids of every module both adapters hold; modules only one holds are listed, not compared."""
    _, _, f1 = adapter_factors(first)
    _, _, f2 = adapter_factors(second)
    shared = sorted(set(f1) & set(f2))
    if not shared:
        raise LorakitError(f"{first} and {second} share no adapted module (they target different layers or "
                           "models); compare adapters of the same base and targets")
    modules = []
    for name in shared:
        vs = []
        for folder, factors in ((first, f1), (second, f2)):
            A, B = factors[name]["A"], factors[name]["B"]
            if not bool(B.any()) or not bool(A.any()):
                raise LorakitError(f"{folder}: module {name} has a zero update (B·A = 0: an untrained adapter?); "
                                   "its singular directions are undefined, so there is nothing to compare")
            vs.append(right_singular_vectors(A, B))
        grid = phi(*vs)
        modules.append({"module": name, "r1": vs[0].shape[1], "r2": vs[1].shape[1], "in": vs[0].shape[0],
                        "phi": [[round(float(x), 6) for x in row] for row in grid]})
    return {"first": str(first), "second": str(second), "modules": modules,
            "only_first": sorted(set(f1) - set(f2)), "only_second": sorted(set(f2) - set(f1))}


def mean_grid(result: dict) -> torch.Tensor:
    """φ averaged over the compared modules (their grids share (r1, r2))."""
    return torch.tensor([m["phi"] for m in result["modules"]], dtype=torch.float64).mean(0)


def format_comparison(result: dict) -> str:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= min(result["modules"][0]["r1"], result["modules"][0]["r2"])]
    lines = [f"subspace similarity φ(i, j) of {result['first']} (r1) and {result['second']} (r2); "
             "1 = the same directions, ~max(i, j)/in = unrelated", "",
             f"{'module':60s} {'r1':>3s} {'r2':>3s} " + " ".join(f"{f'φ({k},{k})':>8s}" for k in ks)]
    for m in result["modules"]:
        lines.append(f"{m['module'][-60:]:60s} {m['r1']:3d} {m['r2']:3d} "
                     + " ".join(f"{m['phi'][k - 1][k - 1]:8.3f}" for k in ks))
    grid = mean_grid(result)
    lines.append(f"{'mean over ' + str(len(result['modules'])) + ' modules':60s} {'':3s} {'':3s} "
                 + " ".join(f"{float(grid[k - 1, k - 1]):8.3f}" for k in ks))
    for key, label in (("only_first", result["first"]), ("only_second", result["second"])):
        if result[key]:
            lines.append(f"only in {label} (not compared): {len(result[key])} modules")
    return "\n".join(lines)


def plot_comparison(result: dict, png: str | Path) -> Path:
    """Heat map of the mean φ(i, j) over modules."""
    plt = figure.pyplot(png)
    grid = mean_grid(result).numpy()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    image = ax.imshow(grid, origin="lower", vmin=0, vmax=1, cmap="viridis", aspect="auto",
                      extent=(0.5, grid.shape[1] + 0.5, 0.5, grid.shape[0] + 0.5))
    fig.colorbar(image, ax=ax, label="φ(i, j)")
    ax.set_xlabel(f"j (top directions of {Path(result['second']).name})")
    ax.set_ylabel(f"i (top directions of {Path(result['first']).name})")
    ax.set_title(f"subspace similarity, mean over {len(result['modules'])} modules", fontsize=9)
    return figure.save(fig, png)
