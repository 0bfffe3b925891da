"""The Fastfood map: equal to a dense restatement, deterministic for a seed, its backward the adjoint."""

import numpy as np
import torch

from lorakit.analysis.fastfood import Fastfood, fwht


def _hadamard(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])  # Sylvester order
    return h


def _dense_reference(ff: Fastfood) -> np.ndarray:
    """P = scale · S_D · H · diag(G) · Π · H · diag(B) · pad, from numpy matrices."""
    n = ff.n
    h = _hadamard(n)
    perm = np.zeros((n, n))
    perm[np.arange(n), ff.perm.numpy()] = 1  # (Π v)_k = v_perm[k]
    full = h @ np.diag(ff.gauss.double().numpy()) @ perm @ h @ np.diag(ff.signs.double().numpy())
    return ff.scale * full[:ff.size, :ff.d]


def test_fwht_is_the_hadamard_matrix():
    x = torch.randn(3, 16, dtype=torch.float64)
    assert np.allclose(fwht(x).numpy(), x.numpy() @ _hadamard(16).T)


def test_fastfood_equals_dense_reference():
    for size, d in [(20, 5), (7, 13), (64, 64), (1, 3)]:
        ff = Fastfood(size, d, seed=3, dtype=torch.float64)
        ref = _dense_reference(ff)
        assert np.allclose(ff.dense().numpy(), ref, atol=1e-12)
        x = torch.randn(d, dtype=torch.float64)
        assert np.allclose(ff(x).numpy(), ref @ x.numpy(), atol=1e-12)


def test_columns_are_about_unit_norm():
    ff = Fastfood(4000, 50, seed=0, dtype=torch.float64)
    norms = ff.dense().norm(dim=0)
    assert abs(float(norms.mean()) - 1) < 0.1


def test_deterministic_for_a_seed():
    a, b, c = Fastfood(30, 6, seed=11), Fastfood(30, 6, seed=11), Fastfood(30, 6, seed=12)
    x = torch.randn(6)
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), c(x))


def test_gradcheck():
    for size, d in [(20, 5), (5, 9)]:
        ff = Fastfood(size, d, seed=1, dtype=torch.float64)
        x = torch.randn(d, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(ff, (x,))
        xb = torch.randn(2, d, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(ff, (xb,))


def test_backward_is_the_dense_transpose():
    ff = Fastfood(33, 7, seed=5, dtype=torch.float64)
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(33, dtype=torch.float64)
    ff(x).backward(g)
    assert np.allclose(x.grad.numpy(), _dense_reference(ff).T @ g.numpy(), atol=1e-12)
