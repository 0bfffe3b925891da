"""Slot pools and the gathered per-token path of a TokenPlan: equal to the per-adapter GEMMs and to the
formula, with mixed ranks, padded or per rank, and following adapters that change or leave."""

import pytest
import torch
from torch import nn

from lorakit.layers import BASE, LoraLayer, Pools, TokenPlan, using_row_plan


def layer_with(ranks: dict, seed=0):
    torch.manual_seed(seed)
    layer = LoraLayer(nn.Linear(12, 10))
    for name, r in ranks.items():
        layer.add(name, r, scaling=2.0 / r, init=False)
        with torch.no_grad():
            layer.lora_A[name].normal_(), layer.lora_B[name].normal_()
        layer.lora_A[name].requires_grad_(False), layer.lora_B[name].requires_grad_(False)
    return layer.eval()


def formula(layer, x, names):
    out = layer.base_layer(x)[0].clone()
    for i, name in enumerate(names):
        if name != BASE:
            A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
            out[i] += s * (B @ (A @ x[0, i]))
    return out


NAMES = [BASE, "a", "a", "a", "b", "c", "c", "d", BASE, "e"]  # a prefill slice of 3, single tokens


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("long", [1, 2, 16])  # 1: all per-adapter GEMMs; 16: all gathered
def test_gathered_equals_the_formula_with_mixed_ranks(padded, long):
    layer = layer_with({"a": 4, "b": 8, "c": 4, "d": 2, "e": 8})
    x = torch.randn(1, len(NAMES), 12)
    pools = Pools(padded=padded)
    with torch.inference_mode():
        for _ in range(2):  # the second call reuses the slots
            with using_row_plan(TokenPlan(NAMES, NAMES[-1:], pools, long=long, gather_min=1)):
                got = layer(x)[0]
            torch.testing.assert_close(got, formula(layer, x, NAMES), atol=1e-5, rtol=1e-5)
    if long == 16:
        per_layer = pools._pools[layer]
        assert sorted(per_layer) == ([-1] if padded else [2, 4, 8])
        assert all(p.r == 8 for p in per_layer.values()) if padded else True


def test_non_contiguous_group_and_slot_reuse():
    layer = layer_with({"a": 4, "b": 8, "c": 4})
    names = ["a", "b", "c"]  # rank 4 tokens at 0 and 2: not contiguous
    x = torch.randn(1, 3, 12)
    pools = Pools()
    with torch.inference_mode(), using_row_plan(TokenPlan(names, ["c"], pools, gather_min=1)):
        torch.testing.assert_close(layer(x)[0], formula(layer, x, names), atol=1e-5, rtol=1e-5)
    layer.delete("a")  # its slot is freed, then taken by a new adapter of another name
    layer.add("z", 4, scaling=0.5, init=False)
    layer.lora_A["z"].requires_grad_(False), layer.lora_B["z"].requires_grad_(False)
    names = ["z", "b", "c"]
    with torch.inference_mode(), using_row_plan(TokenPlan(names, ["c"], pools, gather_min=1)):
        torch.testing.assert_close(layer(x)[0], formula(layer, x, names), atol=1e-5, rtol=1e-5)
    assert len(pools._pools[layer][4].slots) == 2
    layer.delete("c")
    layer.add("c", 4, scaling=0.5, init=False)  # the same name back with other weights
    with torch.inference_mode(), using_row_plan(TokenPlan(names, ["c"], pools, gather_min=1)):
        torch.testing.assert_close(layer(x)[0], formula(layer, x, names), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        layer.lora_B["c"].mul_(3)  # changed in place: the version counter moves
    with torch.inference_mode(), using_row_plan(TokenPlan(names, ["c"], pools, gather_min=1)):
        torch.testing.assert_close(layer(x)[0], formula(layer, x, names), atol=1e-5, rtol=1e-5)


def test_pool_grows_past_its_first_capacity():
    ranks = {f"n{i}": 4 for i in range(11)}
    layer = layer_with(ranks)
    names = list(ranks)
    x = torch.randn(1, len(names), 12)
    pools = Pools()
    with torch.inference_mode(), using_row_plan(TokenPlan(names, names[-1:], pools, gather_min=1)):
        torch.testing.assert_close(layer(x)[0], formula(layer, x, names), atol=1e-5, rtol=1e-5)
    assert pools._pools[layer][4].A.shape[0] >= 11 and pools._pools[layer][4].B.shape[0] >= 11


def test_few_short_slices_keep_the_per_adapter_gemms():
    layer = layer_with({"a": 4, "b": 8})
    x = torch.randn(1, 2, 12)
    pools = Pools()
    with torch.inference_mode(), using_row_plan(TokenPlan(["a", "b"], ["b"], pools, gather_min=2)):
        torch.testing.assert_close(layer(x)[0], formula(layer, x, ["a", "b"]), atol=1e-5, rtol=1e-5)
    assert layer not in pools._pools  # one slice per rank: under gather_min, nothing gathered


@pytest.mark.parametrize("long", [1, 16])  # 1: per-adapter GEMMs; 16: gathered
def test_fp32_adapters_on_a_bf16_base(long):
    """The casts of both paths: bf16 activations into fp32 factors, the fp32 delta back into the bf16 output."""
    layer = layer_with({"a": 4, "b": 8, "c": 4})
    layer.base_layer.to(torch.bfloat16)
    names = ["a", "a", "b", BASE, "c"]
    x = torch.randn(1, len(names), 12, dtype=torch.bfloat16)
    with torch.inference_mode(), using_row_plan(TokenPlan(names, names[-1:], Pools(), long=long, gather_min=1)):
        got = layer(x)[0]
    assert got.dtype == torch.bfloat16
    want = layer.base_layer(x)[0].float()
    for i, name in enumerate(names):
        if name != BASE:
            A, B, s = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
            want[i] += s * (B @ (A @ x[0, i].float()))
    torch.testing.assert_close(got.float(), want, atol=0.1, rtol=0.02)
    assert (got.float() - layer.base_layer(x)[0].float()).abs().max() > 0.1  # the adapters did add something
