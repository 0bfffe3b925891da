"""Subspace similarity φ: 1 for identical adapters, equal to a numpy restatement on random ones; the CLI."""

import json

import numpy as np
import pytest
import torch

from lorakit import LorakitError, LoraConfig, add_adapter
from lorakit.adapters.files import save_adapter
from lorakit.analysis.subspace import compare_adapters, phi, right_singular_vectors
from lorakit.cli import main

from conftest import tiny_llama

TARGETS = ["q_proj", "v_proj"]


def _adapter(folder, r, seed):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    save_adapter(model, folder)
    return folder


def _numpy_phi(A1, B1, A2, B2, i, j):
    """The paper's definition on dense ΔW: right singular vectors from numpy's SVD."""
    v1 = np.linalg.svd(B1 @ A1)[2][:A1.shape[0]].T
    v2 = np.linalg.svd(B2 @ A2)[2][:A2.shape[0]].T
    return np.linalg.norm(v1[:, :i].T @ v2[:, :j]) ** 2 / min(i, j)


def test_phi_matches_numpy_on_random_factors():
    rng = np.random.default_rng(0)
    A1, B1 = rng.normal(size=(4, 30)), rng.normal(size=(20, 4))
    A2, B2 = rng.normal(size=(6, 30)), rng.normal(size=(20, 6))
    grid = phi(right_singular_vectors(torch.tensor(A1), torch.tensor(B1)),
               right_singular_vectors(torch.tensor(A2), torch.tensor(B2)))
    assert grid.shape == (4, 6)
    for i in range(1, 5):
        for j in range(1, 7):
            assert abs(float(grid[i - 1, j - 1]) - _numpy_phi(A1, B1, A2, B2, i, j)) < 1e-9


def test_identical_adapters_give_one_and_different_ones_less(tmp_path):
    a = _adapter(tmp_path / "a", 4, seed=1)
    b = _adapter(tmp_path / "b", 8, seed=2)
    same = compare_adapters(a, a)
    for m in same["modules"]:
        assert np.allclose(np.diag(m["phi"]), 1.0)  # φ(i, i) = 1: the same top-i directions
        assert np.allclose(m["phi"], 1.0)  # and every top-i lies within top-j of itself, for all i, j
    other = compare_adapters(a, b)
    assert {(m["r1"], m["r2"]) for m in other["modules"]} == {(4, 8)}
    assert max(m["phi"][0][0] for m in other["modules"]) < 0.9  # random 32-dim directions rarely align
    assert all(abs(m["phi"][3][7] - 1) > 1e-3 for m in other["modules"])


def test_compare_cli_table_heat_map_and_json(tmp_path, capsys):
    a = _adapter(tmp_path / "a", 4, seed=1)
    b = _adapter(tmp_path / "b", 2, seed=3)
    assert main(["inspect", str(a), "--compare", str(b)]) == 0
    out = capsys.readouterr().out
    assert "φ(1,1)" in out and "mean over 4 modules" in out and (a / "compare.png").stat().st_size > 1000
    assert main(["inspect", str(a), "--compare", str(b), "--json", "--png", str(tmp_path / "h.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["modules"]) == 4 and (tmp_path / "h.png").is_file()


def test_untrained_adapter_is_refused(tmp_path):
    model = tiny_llama()
    add_adapter(model, LoraConfig(r=4, target_modules=TARGETS))  # B = 0
    save_adapter(model, tmp_path / "z")
    with pytest.raises(LorakitError, match="zero update"):
        compare_adapters(tmp_path / "z", tmp_path / "z")
    assert main(["inspect", str(tmp_path / "z"), "--compare", str(tmp_path / "z")]) == 2
