"""MiCA (layers/mica.py, init_lora_weights="mica"): the same numbers as PEFT 0.21.

Against the installed PEFT: the same factors from the same seed (B = the minor left singular vectors of
W0, or of W0ᵀ for an embedding; A = 0), on nn.Linear, GPT-2's Conv1D and nn.Embedding; B frozen while A
trains, to the same parameters after training steps; files both ways (a loaded MiCA adapter keeps B
frozen); merging equals the unmerged forward; what PEFT refuses is a LorakitError.
"""

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig, LorakitError
from conftest import tiny_gpt2, tiny_llama
from peft_pairs import assert_same_params, lora_params, randomized

peft = pytest.importorskip("peft")

CASES = {  # model, targets (linear; GPT-2's fused Conv1D; an embedding next to linear layers)
    "llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
    "embedding": (tiny_llama, ["embed_tokens", "o_proj"]),
}


def _pair(case, seed=1, **kw):
    make, targets = CASES[case]
    base = make()
    kwargs = dict(target_modules=targets, r=4, lora_alpha=8, init_lora_weights="mica", **kw)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
    torch.manual_seed(seed)
    ours = lorakit.get_peft_model(copy.deepcopy(base), LoraConfig(**kwargs))
    return theirs, ours


@pytest.mark.parametrize("case", list(CASES))
def test_init_matches_peft_and_b_is_frozen(case, ids):
    theirs, ours = _pair(case)
    assert_same_params(theirs, ours)
    params = lora_params(ours)
    A = [p for k, p in params.items() if ".lora_A." in k]
    B = [p for k, p in params.items() if ".lora_B." in k]
    assert A and all(not a.any() and a.requires_grad for a in A)  # A = 0 and trainable
    assert all(not b.requires_grad for b in B)  # B frozen
    for name, layer in ours.base_model.model.named_modules():  # B: orthonormal minor left singular vectors
        if isinstance(layer, lorakit.LoraLayer) and "default" in layer.lora_B:
            W = layer.dense_weight().float()
            W = W.T if layer.kind == "embedding" else W
            U, S, _ = torch.linalg.svd(W, full_matrices=False)
            Bk = layer.lora_B["default"]
            torch.testing.assert_close(Bk.T @ Bk, torch.eye(4), atol=1e-5, rtol=0)
            torch.testing.assert_close((Bk.T @ U[:, -4:]).abs(), torch.eye(4), atol=1e-4, rtol=0)
    with torch.no_grad():  # A = 0: the adapted model starts at the base model
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-6, rtol=0)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize("case", ["gpt2", "embedding"])
def test_training_matches_peft_and_leaves_b_alone(case, ids):
    theirs, ours = _pair(case)
    B0 = {k: p.detach().clone() for k, p in lora_params(ours).items() if ".lora_B." in k}
    for model in (theirs, ours):
        model.train()
        torch.manual_seed(7)  # the same dropout masks in both
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
    assert_same_params(theirs, ours, atol=1e-5)
    after = lora_params(ours)
    assert all(torch.equal(after[k], B0[k]) for k in B0)
    assert all(after[k].abs().sum() > 0 for k in after if ".lora_A." in k)  # A learnt
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_files_load_both_ways(tmp_path, ids):
    theirs, ours = _pair("embedding", seed=2)
    randomized(theirs, 5, only=".lora_A."), randomized(ours, 6, only=".lora_A.")
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    back = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft", is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    trainable = {k for k, p in lora_params(back).items() if p.requires_grad}
    assert trainable and all(".lora_A." in k for k in trainable)  # as PEFT: B stays frozen after loading


def test_set_adapter_keeps_b_frozen():
    model = lorakit.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4, init_lora_weights="mica"))
    model.add_adapter("other", LoraConfig(target_modules=["q_proj"], r=4))
    model.set_adapter("other")
    model.set_adapter("default")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].requires_grad and not layer.lora_B["default"].requires_grad


def test_merge_equals_unmerged(ids):
    _, ours = _pair("embedding")
    randomized(ours, only=".lora_A.")
    W0 = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        ours.merge_adapter()
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        ours.unmerge_adapter()
        for n, p in ours.named_parameters():
            if n in W0:
                torch.testing.assert_close(p, W0[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.merge_and_unload()(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_what_peft_refuses_is_a_clean_error():
    with pytest.raises(LorakitError, match=r"r <= min"):  # q_proj is 32 x 32
        lorakit.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=40, init_lora_weights="mica"))
    conv = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(LorakitError, match="linear and embedding"):
        lorakit.get_peft_model(conv, LoraConfig(target_modules=["0"], r=2, init_lora_weights="mica"))
    with pytest.raises(LorakitError, match="cannot be combined"):
        LoraConfig(target_modules=["q_proj"], init_lora_weights="mica", use_dora=True)
    with pytest.raises(LorakitError, match="nothing"):
        LoraConfig(target_modules=["q_proj"], init_lora_weights="mica", lora_fa=True)
