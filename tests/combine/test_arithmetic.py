"""Tests for lorakit.combine.arithmetic against dense arithmetic written out here, and against peft.

Every expected value is computed independently in float64 from the formulas (ΔW = s · B @ A,
TIES trim/elect/disjoint-mean, DARE drop-and-rescale, DoRA row renormalisation); peft's
merge_utils and DoRA layer serve as a second reference. Tensors are tiny so the file runs fast.
"""

import math

import pytest
import torch

from lorakit.combine.arithmetic import (
    Factors,
    combine,
    combine_dense,
    combine_dora,
    delta,
    dora_effective_delta,
    negate,
    truncate,
)
from lorakit.errors import LorakitError

OUT, IN = 12, 10


def make(r, alpha=8.0, rslora=False, seed=0, out=OUT, inp=IN, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, inp, generator=g, dtype=torch.float64)
    B = torch.randn(out, r, generator=g, dtype=torch.float64)
    s = alpha / math.sqrt(r) if rslora else alpha / r
    return Factors(A.to(dtype), B.to(dtype), s)


def dense64(f):
    return f.scaling * (f.B.double() @ f.A.double())


product64 = dense64  # the same formula, read on a result: its scaling · B @ A


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm()).item()


@pytest.fixture
def three():
    return [make(2, 4.0, seed=1), make(3, 16.0, rslora=True, seed=2), make(5, 5.0, rslora=True, seed=3)]


# ---------------------------------------------------------------- delta, negate, cat


def test_delta_is_scaled_product():
    f = make(3, alpha=6.0)
    torch.testing.assert_close(delta(f), 2.0 * f.B @ f.A)


def test_negate_is_exact():
    f = make(4)
    n = negate(f)
    assert torch.equal(delta(n), -delta(f))
    assert n.A is f.A and n.scaling == f.scaling


@pytest.mark.parametrize("target_scaling", [1.0, 2.5, -0.5])
def test_cat_is_exact_for_different_ranks_and_scalings(three, target_scaling):
    weights = [0.7, -1.0, 2.5]
    got, info = combine(three, weights, "cat", target_scaling=target_scaling)
    want = sum(w * dense64(f) for f, w in zip(three, weights))
    assert info["rank"] == 10 and info["relative_error"] == 0.0 and info["method"] == "cat"
    assert got.A.shape == (10, IN) and got.B.shape == (OUT, 10) and got.scaling == target_scaling
    assert rel(product64(got), want) < 1e-6
    assert torch.equal(got.A, torch.cat([f.A for f in three]))


def test_cat_keeps_dtype_and_accepts_its_own_rank(three):
    half = [Factors(f.A.bfloat16(), f.B.bfloat16(), f.scaling) for f in three]
    got, info = combine(half, [1.0, 1.0, 1.0], "cat", rank=10)
    assert got.A.dtype == got.B.dtype == torch.bfloat16 and info["rank"] == 10


def test_cat_with_weight_minus_one_is_negation():
    f = make(3)
    got, _ = combine([f], [-1.0], "cat", target_scaling=f.scaling)
    assert torch.equal(delta(got), delta(negate(f)))


# ---------------------------------------------------------------- linear / svd / truncate


@pytest.mark.parametrize("target_scaling", [1.0, 0.5, -3.0])
def test_linear_at_full_rank_is_exact(three, target_scaling):
    weights = [0.3, 1.5, -0.8]
    got, info = combine(three, weights, "linear", target_scaling=target_scaling)
    want = sum(w * dense64(f) for f, w in zip(three, weights))
    assert info["rank"] == 10 and info["relative_error"] < 1e-6
    assert got.A.shape == (10, IN) and got.B.shape == (OUT, 10) and got.scaling == target_scaling
    assert rel(product64(got), want) < 1e-5


@pytest.mark.parametrize("method", ["linear", "svd"])
@pytest.mark.parametrize("k", [1, 4, 7])
def test_linear_low_rank_is_the_eckart_young_optimum(three, method, k):
    weights = [1.0, -0.5, 2.0]
    got, info = combine(three, weights, method, rank=k, target_scaling=2.0)
    want = sum(w * dense64(f) for f, w in zip(three, weights))
    U, S, Vh = torch.linalg.svd(want)
    best = (U[:, :k] * S[:k]) @ Vh[:k]
    expected_err = (S[k:].square().sum().sqrt() / S.square().sum().sqrt()).item()
    assert info["rank"] == k and info["method"] == "linear"
    assert info["relative_error"] == pytest.approx(expected_err, rel=1e-6, abs=1e-9)
    assert rel(product64(got), want) == pytest.approx(expected_err, rel=1e-4, abs=1e-6)
    assert rel(product64(got), best) < 1e-5  # the σ are distinct, so the optimum is unique
    torch.testing.assert_close(info["singular_values"][:10].double(), S[:10], rtol=1e-6, atol=1e-9)


def test_linear_splits_singular_values_evenly(three):
    got, info = combine(three, [1.0, 1.0, 1.0], "linear", rank=6, target_scaling=4.0)
    torch.testing.assert_close(got.B.norm(dim=0), got.A.norm(dim=1))
    torch.testing.assert_close(got.B.norm(dim=0) ** 2 * 4.0, info["singular_values"][:6].float())


def test_linear_default_rank_is_capped_and_explicit_rank_is_padded():
    fs = [make(3, out=4, inp=6, seed=5), make(3, out=4, inp=6, seed=6)]
    got, info = combine(fs, [1.0, 1.0], "linear")
    assert info["rank"] == 4 and got.A.shape == (4, 6) and got.B.shape == (4, 4)
    want = dense64(fs[0]) + dense64(fs[1])
    assert rel(product64(got), want) < 1e-5
    got, info = combine(fs, [1.0, 1.0], "linear", rank=5)
    assert got.A.shape == (5, 6) and got.B.shape == (4, 5) and info["rank"] == 5
    assert torch.all(got.A[4] == 0) and torch.all(got.B[:, 4] == 0)
    assert rel(product64(got), want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_linear_returns_the_input_dtype(dtype):
    fs = [make(2, seed=7, dtype=dtype), make(2, seed=8, dtype=dtype)]
    got, _ = combine(fs, [1.0, 1.0], "linear", rank=2)
    assert got.A.dtype == got.B.dtype == dtype


def test_truncate_compresses_optimally_and_rescales_exactly():
    f = make(6, alpha=12.0, seed=9)
    want = dense64(f)
    same, info = truncate(f, 6, target_scaling=1.0)
    assert rel(product64(same), want) < 1e-5 and info["relative_error"] < 1e-6
    small, info = truncate(f, 2, target_scaling=16.0 / 2)
    S = torch.linalg.svdvals(want)
    assert info["relative_error"] == pytest.approx((S[2:].square().sum() / S.square().sum()).sqrt().item(), rel=1e-6)
    assert small.A.shape == (2, IN) and small.scaling == 8.0


# ---------------------------------------------------------------- ties / dare / magnitude_prune


def ref_ties(deltas, weights, density, majority_sign, random_keep=None):
    """TIES written entry by entry: trim (or DARE keep masks), elect on unweighted, disjoint mean."""
    kept = []
    for i, d in enumerate(deltas):
        d = d.double().clone()
        if random_keep is not None:
            d = d * random_keep[i] / density
        elif density < 1:
            k = int(density * d.numel())
            threshold = d.abs().flatten().sort(descending=True).values[k - 1]
            d[d.abs() < threshold] = 0
        kept.append(d)
    out = torch.zeros_like(kept[0])
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            vals = [t[r, c].item() for t in kept]
            if majority_sign == "total":
                vote = sum(vals)
            else:
                vote = sum((v > 0) - (v < 0) for v in vals)
            elected = 1 if vote >= 0 else -1
            agreeing = [w * v for v, w in zip(vals, weights) if v != 0 and (v > 0) == (elected > 0)]
            out[r, c] = sum(agreeing) / max(len(agreeing), 1)
    return out


@pytest.fixture
def tiny():
    """Three 4x5 adapters with many sign disagreements."""
    return [make(2, 2.0, out=4, inp=5, seed=s) for s in (11, 12, 13)]


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.4, 1.0])
def test_ties_matches_a_direct_reimplementation_and_peft(tiny, majority_sign, density):
    from peft.utils import merge_utils

    weights = [0.6, 1.2, -0.4]
    got, info = combine(tiny, weights, "ties", rank=4, density=density, majority_sign=majority_sign, target_scaling=2.0)
    want = ref_ties([dense64(f) for f in tiny], weights, density, majority_sign)
    assert info["rank"] == 4 and info["relative_error"] < 1e-6
    assert rel(product64(got), want) < 1e-5
    peft_dense = merge_utils.ties([delta(f) for f in tiny], torch.tensor(weights), density, majority_sign)
    assert rel(product64(got), peft_dense) < 1e-5


def test_ties_svd_alias_and_truncation_error_refers_to_the_ties_target(tiny):
    weights = [1.0, 1.0, 1.0]
    got, info = combine(tiny, weights, "ties_svd", rank=2, density=0.5)
    want = ref_ties([dense64(f) for f in tiny], weights, 0.5, "total")
    S = torch.linalg.svdvals(want)
    assert info["method"] == "ties"
    assert info["relative_error"] == pytest.approx((S[2:].square().sum() / S.square().sum()).sqrt().item(), rel=1e-5)
    assert rel(product64(got), want) == pytest.approx(info["relative_error"], rel=1e-4)


def test_magnitude_prune_matches_peft(tiny):
    from peft.utils import merge_utils

    weights = [0.5, -1.0, 2.0]
    got, _ = combine(tiny, weights, "magnitude_prune", rank=4, density=0.5)
    want = merge_utils.magnitude_prune([delta(f) for f in tiny], torch.tensor(weights), 0.5)
    assert rel(product64(got), want) < 1e-5


@pytest.mark.parametrize("method", ["dare_linear", "dare", "dare_ties"])
def test_dare_is_reproducible_with_a_seeded_generator(tiny, method):
    run = lambda seed: combine(  # noqa: E731
        tiny, [1.0, 0.5, -1.0], method, rank=4, density=0.5, generator=torch.Generator().manual_seed(seed)
    )[0]
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
    assert not torch.allclose(delta(a), delta(c))


def test_dare_masks_are_exactly_bernoulli_draws_from_the_generator(tiny):
    weights = [1.0, 0.5, -1.0]
    got, _ = combine(tiny, weights, "dare_linear", rank=4, density=0.3, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    keeps = [torch.bernoulli(torch.full((4, 5), 0.3), generator=g).double() for _ in tiny]
    want = sum(w * dense64(f) * k / 0.3 for f, w, k in zip(tiny, weights, keeps))
    assert rel(product64(got), want) < 1e-5
    got, _ = combine(tiny, weights, "dare_ties", rank=4, density=0.3, generator=torch.Generator().manual_seed(3))
    want = ref_ties([dense64(f) for f in tiny], weights, 0.3, "total", random_keep=keeps)
    assert rel(product64(got), want) < 1e-5


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_under_the_same_seed(tiny, method):
    from peft.utils import merge_utils

    weights = [0.7, 1.0, -0.3]
    got, _ = combine(tiny, weights, method, rank=4, density=0.6, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(5)
    want = getattr(merge_utils, method)([delta(f) for f in tiny], torch.tensor(weights), 0.6)
    assert rel(product64(got), want) < 1e-5


def test_dare_linear_is_unbiased():
    f = make(8, 8.0, out=8, inp=8, seed=21)
    g = torch.Generator().manual_seed(0)
    runs = [delta(combine([f], [1.0], "dare_linear", density=0.5, generator=g)[0]).double() for _ in range(400)]
    mean = torch.stack(runs).mean(dim=0)
    assert rel(mean, dense64(f)) < 0.15  # std of the mean is about 1/sqrt(400) = 0.05 here


# ---------------------------------------------------------------- DoRA


def test_dora_effective_delta_by_hand():
    W0 = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    f = Factors(A=torch.tensor([[0.0, 4.0]]), B=torch.tensor([[1.0], [0.0]]), scaling=0.5)  # ΔW = [[0, 2], [0, 0]]
    m = torch.tensor([2.0, 3.0])
    # W0 + ΔW = [[3, 2], [0, 1]], row norms sqrt(13) and 1
    want = torch.tensor([[6 / math.sqrt(13) - 3, 4 / math.sqrt(13)], [0.0, 2.0]])
    torch.testing.assert_close(dora_effective_delta(W0, f, m), want)


def test_dora_effective_delta_matches_peft_merge():
    import peft

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0"], use_dora=True, init_lora_weights=False)
    layer = peft.get_peft_model(model, cfg).base_model.model[0]
    with torch.no_grad():
        layer.lora_magnitude_vector["default"].weight.mul_(torch.tensor([1.1, 0.9, 1.3, 0.7]))
    W0 = layer.base_layer.weight.detach().clone()
    f = Factors(layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach(), 1.5)
    m = layer.lora_magnitude_vector["default"].weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(dora_effective_delta(W0, f, m), layer.base_layer.weight.detach() - W0)


def test_combine_dora_combines_effective_deltas():
    W0 = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(30))
    fs = [make(2, seed=31), make(3, seed=32)]
    ms = [torch.linalg.norm(W0, dim=1) * 1.1, torch.linalg.norm(W0, dim=1) * 0.8]
    want = 0.5 * dora_effective_delta(W0, fs[0], ms[0]).double() - 2.0 * dora_effective_delta(W0, fs[1], ms[1]).double()
    got, info = combine_dora(W0, fs, ms, [0.5, -2.0], "linear", rank=IN, target_scaling=2.0)
    assert rel(product64(got), want) < 1e-5 and info["rank"] == IN
    small, info = combine_dora(W0, fs, ms, [0.5, -2.0], "linear")
    assert info["rank"] == 5 and small.A.shape == (5, IN)
    assert rel(product64(small), want) == pytest.approx(info["relative_error"], rel=1e-4)
    dense, _ = combine_dense([dora_effective_delta(W0, f, m) for f, m in zip(fs, ms)], [0.5, -2.0], "svd", rank=5)
    torch.testing.assert_close(delta(dense), delta(small))


def test_combine_dense_defaults_to_exact_full_rank():
    ds = [torch.randn(5, 3, generator=torch.Generator().manual_seed(s)) for s in (40, 41)]
    got, info = combine_dense(ds, [1.0, -1.0], "linear")
    assert info["rank"] == 3 and rel(product64(got), (ds[0] - ds[1]).double()) < 1e-5


# ---------------------------------------------------------------- validation messages


def test_every_combine_problem_is_reported_at_once(three):
    bad = [three[0], make(2, out=OUT + 1, seed=50)]
    with pytest.raises(LorakitError) as err:
        combine(bad, [1.0], "tie", rank=0, density=1.5, majority_sign="mean", target_scaling=0.0, generator=3)
    msg = str(err.value)
    for needle in [
        "updates an (out, in) = (13, 10) weight but factors[0] a (12, 10) one",
        "weights has 1 entries but there are 2 adapters",
        "unknown method 'tie': use one of cat, linear, ties, dare_linear, dare_ties, magnitude_prune, svd, dare",
        "rank = 0: give an integer >= 1",
        "density = 1.5 is outside (0, 1]",
        "majority_sign = 'mean': use 'total' or 'frequency'",
        "target_scaling = 0.0: give the new adapter's nonzero scaling",
        "generator is a int: pass a torch.Generator or None",
    ]:
        assert needle in msg, needle
    assert msg.startswith("combine(method='tie'): 8 problem(s):")


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(method="ties"), "method 'ties' needs density"),
        (dict(method="dare_ties", density=0.0), "density = 0.0 is outside (0, 1]"),
        (dict(method="dare", density=None), "method 'dare' needs density"),
        (dict(method="linear", density=0.5), "density = 0.5 has no effect with method 'linear'"),
        (dict(method="cat", rank=3), "rank = 3 with method 'cat', which is exact with rank Σ r_i = 10"),
        (dict(method="linear", rank=2.5), "rank = 2.5: give an integer >= 1"),
        (dict(method="linear", weights=[1.0, float("nan"), 1.0]), "weights[1] = nan is not a finite number"),
        (dict(method="linear", target_scaling=float("inf")), "target_scaling = inf"),
        (dict(method=None), "unknown method None"),
        (dict(method="linear", weights=torch.ones(3)), "weights is a Tensor: give a list of floats"),
    ],
)
def test_combine_option_errors(three, kwargs, needle):
    kwargs = {"weights": [1.0, 1.0, 1.0], **kwargs}
    with pytest.raises(LorakitError, match="combine") as err:
        combine(three, **kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "factors, needle",
    [
        ([], "factors is empty: pass a list with at least one Factors(A, B, scaling)"),
        ([(torch.zeros(2, 3), torch.zeros(4, 2), 1.0)], "factors[0] is a tuple: wrap it as Factors(A, B, scaling)"),
        ([Factors(torch.zeros(2, 3, 1), torch.zeros(4, 2), 1.0)], "factors[0].A must be a 2-D float tensor (r, in)"),
        ([Factors(torch.zeros(2, 3), torch.zeros(4, 2, dtype=torch.long), 1.0)], "factors[0].B must be a 2-D float"),
        ([Factors(torch.zeros(2, 3), torch.zeros(4, 3), 1.0)], "A is (2, 3) and B is (4, 3); A's rows and B's columns"),
        ([Factors(torch.zeros(0, 3), torch.zeros(4, 0), 1.0)], "must both be the rank r >= 1"),
        ([Factors(torch.zeros(2, 3), torch.zeros(4, 2), float("nan"))], "factors[0].scaling = nan is not a finite"),
    ],
)
def test_combine_factor_errors(factors, needle):
    with pytest.raises(LorakitError) as err:
        combine(factors, [1.0] * len(factors), "linear")
    assert needle in str(err.value)


def test_dare_generator_on_another_device_is_an_error():
    meta = Factors(torch.zeros(2, IN, device="meta"), torch.zeros(OUT, 2, device="meta"), 1.0)  # never computed
    with pytest.raises(LorakitError) as err:
        combine([meta], [1.0], "dare", density=0.5, generator=torch.Generator())
    msg = "generator is on cpu but the adapters on meta: create it with torch.Generator(device='meta')"
    assert msg in str(err.value)


def test_adapters_on_different_devices_are_an_error():
    meta = Factors(torch.zeros(2, IN, device="meta"), torch.zeros(OUT, 2, device="meta"), 1.0)
    with pytest.raises(LorakitError, match=r"factors\[1\] is on meta but factors\[0\] on cpu: move them to one device"):
        combine([make(2), meta], [1.0, 1.0], "cat")


def test_combine_dense_errors():
    with pytest.raises(LorakitError) as err:
        combine_dense([torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(3)], [1.0, 1.0, 1.0], "cat")
    msg = str(err.value)
    assert "deltas[1] updates an (out, in) = (3, 5) weight but deltas[0] a (3, 4) one" in msg
    assert "deltas[2] must be a 2-D float tensor (out, in), got a 1-D torch.float32 tensor" in msg
    assert "method 'cat' needs the factors: use combine(factors, ...)" in msg
    with pytest.raises(LorakitError, match="deltas is empty"):
        combine_dense([], [], "linear")


def test_dora_errors():
    f = make(2)
    with pytest.raises(LorakitError) as err:
        dora_effective_delta(torch.zeros(OUT, IN + 1), f, torch.ones(OUT + 1))
    msg = str(err.value)
    assert "W0 is (12, 11) but the adapter updates an (out, in) = (12, 10) weight" in msg
    assert "magnitude has 13 entries but W0 has 12 output rows" in msg
    with pytest.raises(LorakitError) as err:
        dora_effective_delta(torch.zeros(OUT), f, torch.ones(OUT, 1))
    msg = str(err.value)
    assert "W0 must be the 2-D float base weight (out, in)" in msg
    assert "magnitude must be a 1-D float tensor (out,)" in msg
    with pytest.raises(LorakitError, match="got 1 magnitudes for 2 adapters"):
        combine_dora(torch.zeros(OUT, IN), [f, f], [torch.ones(OUT)], [1.0, 1.0], "linear")
