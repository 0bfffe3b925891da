"""BD-LoRA (layers/bdlora.py, chosen by adapters/variants.py): the same numbers as PEFT 0.21.

Against the installed PEFT: the same init from the same seed (a block-diagonal A is redrawn with torch's
default kaiming, a block-diagonal B is zero), the same outputs and the same parameters after training
steps (so the same gradients), files that load both ways with PEFT's keys and shapes, and merging that
equals the unmerged forward. PEFT's own BdLoraConfig object works inside lorakit's LoraConfig.
"""

import copy

import pytest
import torch
from torch import nn

import lorakit
from lorakit import BdLoraConfig, LoraConfig, LorakitError
from lorakit.layers.bdlora import block_dense, block_linear
from conftest import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from peft.tuners.lora.config import BdLoraConfig as PeftBdLoraConfig  # noqa: E402
from peft_pairs import assert_same_params, lora_params, randomized

LLAMA_BD = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], r=4, lora_alpha=8)
LLAMA_BLOCKS = dict(target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj", "k_proj", "v_proj"],
                    nblocks=2)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.relu, self.lin1 = nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 4)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


MLP_CASES = {  # PEFT's own test cases (test_custom_models.py), and nblocks=4 on both factors
    "A only": dict(target_modules_bd_a=["lin0"], match_strict=False),
    "B only": dict(target_modules_bd_b=["lin1"], nblocks=2, match_strict=False),
    "both": dict(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=2),
    "four blocks": dict(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin1"], nblocks=4),
}


def _pair(make, peft_kwargs, ours_kwargs, seed=1):
    """(PEFT model, lorakit model) on two copies of one base, each adapter drawn from the same seed."""
    base = make()
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**peft_kwargs))
    torch.manual_seed(seed)
    ours = lorakit.get_peft_model(copy.deepcopy(base), LoraConfig(**ours_kwargs))
    return theirs, ours


def _mlp_pair(case, init=True):
    kw = dict(target_modules=["lin0", "lin1"], init_lora_weights=init)
    torch.manual_seed(0)
    return _pair(MLP, {**kw, "use_bdlora": PeftBdLoraConfig(**MLP_CASES[case])},
                 {**kw, "use_bdlora": BdLoraConfig(**MLP_CASES[case])})


@pytest.mark.parametrize("init", [True, False])
@pytest.mark.parametrize("case", list(MLP_CASES))
def test_init_and_forward_match_peft(case, init):
    theirs, ours = _mlp_pair(case, init)
    assert_same_params(theirs, ours)
    x = torch.randn(6, 12)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=1e-5)
    bd = MLP_CASES[case]
    if bd.get("target_modules_bd_a"):  # stored as PEFT does: r rows of in/nblocks
        assert ours.base_model.model.lin0.lora_A["default"].shape == (8, 12 // bd.get("nblocks", 1))
    if bd.get("target_modules_bd_b"):  # B is zero at init whatever init_lora_weights says
        B = ours.base_model.model.lin1.lora_B["default"]
        assert B.shape == (4, 8 // bd["nblocks"]) and not B.any()


@pytest.mark.parametrize("case", ["B only", "four blocks"])
def test_training_steps_match_peft(case):
    """Same parameters after SGD steps on the same loss: the gradients agree."""
    theirs, ours = _mlp_pair(case, init=False)
    x = torch.randn(16, 12)
    for model in (theirs, ours):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(4):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert_same_params(theirs, ours, atol=1e-6)
    assert ours.base_model.model.lin1.lora_B["default"].any()  # it trained
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_llama_training_matches_peft(ids):
    """q/k/v with a block-diagonal B, o/down with a block-diagonal A (PEFT's advice for sharded serving)."""
    theirs, ours = _pair(tiny_llama, {**LLAMA_BD, "use_bdlora": PeftBdLoraConfig(**LLAMA_BLOCKS)},
                         {**LLAMA_BD, "use_bdlora": LLAMA_BLOCKS})
    assert_same_params(theirs, ours)
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
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_files_load_both_ways(tmp_path, ids):
    theirs, ours = _pair(tiny_llama, {**LLAMA_BD, "use_bdlora": PeftBdLoraConfig(**LLAMA_BLOCKS)},
                         {**LLAMA_BD, "use_bdlora": PeftBdLoraConfig(**LLAMA_BLOCKS)}, seed=2)
    randomized(theirs, seed=5), randomized(ours, seed=6)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / who / "adapter_model.safetensors") for who in ("peft", "ours"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    # ours -> PEFT
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # PEFT -> ours
    back = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    assert back.peft_config["default"].use_bdlora == BdLoraConfig(**LLAMA_BLOCKS)
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_merge_equals_unmerged_and_unmerge_restores(ids):
    model = randomized(lorakit.get_peft_model(tiny_llama(), LoraConfig(**LLAMA_BD, use_bdlora=LLAMA_BLOCKS)))
    W0 = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    assert len(W0) == 2 * 5
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        for n, p in model.named_parameters():
            if n in W0:
                torch.testing.assert_close(p, W0[n], atol=1e-6, rtol=0)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_delta_weight_is_the_dense_block_diagonal_product():
    layer = lorakit.LoraLayer(nn.Linear(8, 6))
    from lorakit.layers import BdLora
    layer.add("a", r=4, scaling=0.5, variant=BdLora("A", 2, 4))
    layer.add("b", r=4, scaling=0.5, variant=BdLora("B", 2, 4))
    A = layer.lora_A["a"]
    assert A.shape == (4, 4)
    dense = block_dense(A, 2)
    assert torch.equal(dense[:2, 4:], torch.zeros(2, 4)) and torch.equal(dense[2:, :4], torch.zeros(2, 4))
    torch.testing.assert_close(layer.delta_weight("a"), 0.5 * layer.lora_B["a"] @ dense)
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(block_linear(x, A, 2), x @ dense.T)
    assert layer.lora_B["b"].shape == (6, 2)


@pytest.mark.parametrize("bd, match", [
    (dict(target_modules_bd_a=["lin0"], nblocks=5, match_strict=False), "must divide"),
    (dict(target_modules_bd_a=["lin0"]), "matches neither"),
    (dict(target_modules_bd_a=["lin"], target_modules_bd_b=["lin1"]), "matches both"),
])
def test_bad_patterns_and_block_counts_are_clean_errors(bd, match):
    model = MLP()
    with pytest.raises(LorakitError, match=match):
        lorakit.get_peft_model(model, LoraConfig(target_modules=["lin0", "lin1"], use_bdlora=bd))
    if match != "must divide":  # pattern errors come before any module is wrapped
        assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())


@pytest.mark.parametrize("kwargs, match", [
    (dict(use_dora=True), "cannot be combined"),
    (dict(init_lora_weights="mica"), "cannot be combined"),
    (dict(lora_bias=True), "lora_bias"),
])
def test_config_refuses_what_peft_cannot_do(kwargs, match):
    with pytest.raises(LorakitError, match=match):
        LoraConfig(target_modules=["lin0"], use_bdlora=BdLoraConfig(target_modules_bd_a=["lin0"]), **kwargs)
    with pytest.raises(LorakitError, match="both"):
        BdLoraConfig(target_modules_bd_a=["lin0"], target_modules_bd_b=["lin0"])
    with pytest.raises(LorakitError, match="nblocks"):
        BdLoraConfig(nblocks=0)
    with pytest.raises(LorakitError, match="must be a BdLoraConfig"):
        LoraConfig(target_modules=["lin0"], use_bdlora=["lin0"])


def test_embedding_and_conv1d_targets_are_refused():
    """PEFT has no BD-LoRA for embeddings, and its BD-LoRA fails on GPT-2's Conv1D (no in/out_features)."""
    with pytest.raises(LorakitError, match="nn.Linear layers only"):
        lorakit.get_peft_model(tiny_llama(), LoraConfig(target_modules=["embed_tokens"],
                                                        use_bdlora=BdLoraConfig(target_modules_bd_b=["embed"])))
    with pytest.raises(LorakitError, match="nn.Linear layers only"):
        lorakit.get_peft_model(tiny_gpt2(), LoraConfig(target_modules=["c_attn"],
                                                       use_bdlora=BdLoraConfig(target_modules_bd_a=["c_attn"])))


def test_config_file_form_is_peft_s():
    cfg = LoraConfig(target_modules=["lin0"], use_bdlora=PeftBdLoraConfig(target_modules_bd_a=["lin0"], nblocks=2))
    d = cfg.to_dict()
    assert d["use_bdlora"] == {"target_modules_bd_a": ["lin0"], "target_modules_bd_b": None, "nblocks": 2,
                               "match_strict": True}
    assert peft.LoraConfig(**{k: v for k, v in d.items() if k in peft.LoraConfig.__dataclass_fields__}
                           ).use_bdlora.nblocks == 2
    assert LoraConfig.from_dict(d).use_bdlora == cfg.use_bdlora


def test_bf16_base_matches_peft(ids):
    """On a bf16 base the block-diagonal factor is drawn in bf16, then kept in fp32 (autocast_adapter_dtype)."""
    kw, bd = dict(target_modules=["q_proj", "o_proj"], r=4), dict(target_modules_bd_a=["o_proj"],
                                                                    target_modules_bd_b=["q_proj"], nblocks=2)
    theirs, ours = _pair(lambda: tiny_llama().to(torch.bfloat16), {**kw, "use_bdlora": PeftBdLoraConfig(**bd)},
                         {**kw, "use_bdlora": bd})
    assert_same_params(theirs, ours)
    assert all(p.dtype == torch.float32 for p in lora_params(ours).values())
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-3, rtol=0)
        theirs.merge_adapter(), ours.merge_adapter()
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-3, rtol=0)


def test_combining_bdlora_adapters_is_refused():
    bd = dict(target_modules_bd_a=["lin0"])
    model = lorakit.get_peft_model(MLP(), LoraConfig(target_modules=["lin0"], use_bdlora=bd))
    model.add_adapter("other", LoraConfig(target_modules=["lin0"]))
    with pytest.raises(LorakitError, match="BD-LoRA"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="linear")
