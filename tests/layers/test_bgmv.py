"""The compiled BGMV kernel (layers/bgmv.py): equal to the torch gather and to the formula, its bounds
checked; bf16 layers keep the torch gather (the engine's fallback is tested in tests/serve/test_engine.py)."""

import shutil

import pytest
import torch

from lorakit.layers import BASE, Pools, TokenPlan, bgmv, using_row_plan
from test_pool import formula, layer_with


@pytest.fixture(scope="module")
def kernel():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine")
    module = bgmv.load()
    assert module is not None, f"the BGMV kernel did not build: {bgmv.why_not()}"
    return module


@pytest.mark.parametrize("r,din,dout", [(4, 12, 10), (8, 64, 33), (16, 7, 130)])
def test_kernel_equals_the_torch_gather(kernel, r, din, dout):
    torch.manual_seed(r)
    A, B = torch.randn(6, din, r), torch.randn(6, r, dout)
    rows = torch.randn(9, din + 3)[:, :din]  # rows of a wider tensor: a row stride other than din
    out = torch.randn(9, dout)
    slot = torch.tensor([5, 0, 0, 3, 1])  # repeated slots: the same adapter for two tokens
    lo = 2
    want = out.clone()
    want[lo:lo + 5] += torch.bmm(torch.bmm(rows[lo:lo + 5].unsqueeze(1), A[slot]), B[slot]).squeeze(1)
    kernel.bgmv_(out, rows, A, B, slot, lo)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_kernel_checks_its_arguments(kernel):
    A, B, x, out = torch.randn(2, 4, 2), torch.randn(2, 2, 3), torch.randn(3, 4), torch.zeros(3, 3)
    with pytest.raises(RuntimeError, match="slot out of range"):
        kernel.bgmv_(out, x, A, B, torch.tensor([0, 2]), 0)
    with pytest.raises(RuntimeError, match="outside the rows"):
        kernel.bgmv_(out, x, A, B, torch.tensor([0, 1]), 2)
    with pytest.raises(RuntimeError, match="float32"):
        kernel.bgmv_(out.double(), x, A, B, torch.tensor([0]), 0)
    assert out.abs().sum() == 0  # nothing written by a refused call


@pytest.mark.parametrize("padded", [False, True])
def test_token_plan_with_the_kernel_equals_the_formula(kernel, padded):
    layer = layer_with({"a": 4, "b": 8, "c": 4, "d": 2, "e": 8})
    names = [BASE, "d", "a", "a", "a", "c", "c", "b", "e"]  # as the engine orders a step: by rank, then adapter
    x = torch.randn(1, len(names), 12)
    pools, calls = Pools(padded=padded), []

    class Counting:  # the kernel, counting its calls: the gathered groups must go through it
        def bgmv_(self, *args):
            calls.append(args[-1])
            return kernel.bgmv_(*args)

    with torch.inference_mode():
        for _ in range(2):
            with using_row_plan(TokenPlan(names, names[-1:], pools, long=16, gather_min=1, kernel=Counting())):
                got = layer(x)[0]
            torch.testing.assert_close(got, formula(layer, x, names), atol=1e-5, rtol=1e-5)
    assert calls == ([1] if padded else [1, 2, 7]) * 2  # each rank group's first token: one call per group


def test_bf16_layers_take_the_torch_gather(kernel):
    layer = layer_with({"a": 4, "b": 4, "c": 4}).to(torch.bfloat16)
    names = ["a", "b", "c"]
    x = torch.randn(1, 3, 12, dtype=torch.bfloat16)

    class Refusing:
        def bgmv_(self, *args):
            raise AssertionError("the kernel is fp32 only")

    with torch.inference_mode(), using_row_plan(TokenPlan(names, ["c"], Pools(), gather_min=1, kernel=Refusing())):
        got = layer(x)[0]
    torch.testing.assert_close(got.float(), formula(layer.float(), x.float(), names), atol=0.1, rtol=0.05)


def test_with_grad_the_torch_gather_runs(kernel):
    """Under autograd the kernel (which writes outside it) is not used: gradients reach the input."""
    layer = layer_with({"a": 4, "b": 4, "c": 4})
    names = ["a", "b", "c"]
    x = torch.randn(1, 3, 12, requires_grad=True)

    class Refusing:
        def bgmv_(self, *args):
            raise AssertionError("the kernel ran under autograd")

    with using_row_plan(TokenPlan(names, ["c"], Pools(), gather_min=1, kernel=Refusing())):
        got = layer(x)[0]
    got.sum().backward()
    torch.testing.assert_close(got, formula(layer, x, names), atol=1e-5, rtol=1e-5)
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_a_kernel_write_bumps_the_version_counter(kernel):
    A, B, x, out = torch.randn(2, 4, 2), torch.randn(2, 2, 3), torch.randn(3, 4), torch.zeros(3, 3)
    before = out._version
    kernel.bgmv_(out, x, A, B, torch.tensor([0, 1]), 1)
    assert out._version == before + 1
