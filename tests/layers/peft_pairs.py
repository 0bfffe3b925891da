"""Helpers for the tests that hold a lorakit variant against PEFT's own (test_bdlora.py, test_mica.py): one
naming for both libraries' adapter tensors, the same-values check, and random adapter values."""

import torch


def lora_params(model) -> dict:
    """Adapter tensors under one naming: PEFT's `lora_A.default.weight` / `lora_embedding_A.default` and
    lorakit's `lora_A.default`."""
    return {n.removesuffix(".weight").replace("lora_embedding_", "lora_"): p
            for n, p in model.named_parameters() if ".lora_" in n}


def assert_same_params(theirs, ours, atol=0.0):
    """The same adapter tensors: names, shapes, requires_grad and values (exactly, unless atol)."""
    a, b = lora_params(theirs), lora_params(ours)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert a[k].requires_grad == b[k].requires_grad, k
        torch.testing.assert_close(b[k], a[k], atol=atol, rtol=0 if atol == 0 else 1e-5, msg=k)


def randomized(model, seed=3, only: str = ".lora_"):
    """`model` with every adapter tensor whose name contains `only` set to random values (so B is not zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in lora_params(model).items():
            if only in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model
