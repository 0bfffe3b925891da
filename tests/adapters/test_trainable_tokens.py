"""Trainable tokens (adapters/trainable_tokens.py) against PEFT 0.21's trainable_token_indices: the same
outputs and training steps (tied and untied heads), gradients only on the chosen rows, PEFT's keys in
files both ways, merge / unmerge, several adapters, and clean errors."""

import copy

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import LorakitError
from conftest import tiny_llama

ROWS = [1, 5, 7]


class EmbMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin0, self.lin1 = nn.Embedding(30, 6), nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, ids):
        return self.lin1(torch.tanh(self.lin0(self.emb(ids)))).sum(1)


IDS = torch.tensor([[1, 2, 5, 9], [7, 7, 0, 1]])


def _pair(model, **kw):
    """PEFT and lorakit on copies of `model`, each from seed 3."""
    torch.manual_seed(3)
    p = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kw))
    torch.manual_seed(3)
    lk = lorakit.get_peft_model(copy.deepcopy(model), lorakit.LoraConfig(**kw))
    return p, lk


def _perturb(p, lk, name="default"):
    """Trained-looking rows and B in PEFT, copied into lorakit through the file keys."""
    torch.manual_seed(5)
    with torch.no_grad():
        for n, t in p.named_parameters():
            if t.requires_grad and ("lora_B" in n or "trainable_tokens_delta" in n):
                t.normal_()
    lorakit.set_peft_model_state_dict(lk, peft.get_peft_model_state_dict(p, adapter_name=name), adapter_name=name)


def _rows(model):
    return model.base_model.model.emb.token_adapter.trainable_tokens_delta


def test_starts_as_the_base_and_matches_peft_after_changes():
    base = EmbMLP()
    p, lk = _pair(base, target_modules=["lin0"], trainable_token_indices={"emb": ROWS})
    torch.testing.assert_close(_rows(lk)["default"], base.emb.weight[ROWS])  # a copy of the base rows
    _perturb(p, lk)
    torch.testing.assert_close(lk(IDS), p(IDS), rtol=0, atol=1e-6)
    assert type(lk.base_model.model.emb).__name__ == "TokenWrapper"
    torch.testing.assert_close(lk.base_model.model.emb.weight[ROWS], _rows(lk)["default"])


def test_gradients_reach_only_the_chosen_rows():
    base = EmbMLP()
    _, lk = _pair(base, target_modules=["lin0"], trainable_token_indices={"emb": ROWS})
    emb = lk.base_model.model.emb.token_adapter
    assert not emb.base_layer.weight.requires_grad
    opt = torch.optim.SGD([t for t in lk.parameters() if t.requires_grad], lr=0.5)
    for _ in range(3):
        lk(IDS).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    assert emb.base_layer.weight.grad is None
    effective = lk.base_model.model.emb.weight.detach()
    changed = (effective != base.emb.weight).any(dim=1).nonzero().flatten().tolist()
    assert changed == ROWS  # the chosen rows learned (1, 5, 7 are all in IDS); no other row moved


@pytest.mark.parametrize("tie", [True, False])
def test_tiny_llama_training_steps_match_peft(tie):
    base = tiny_llama(tie=tie)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(123))
    p, lk = _pair(base, target_modules=["q_proj"], trainable_token_indices=ROWS)
    head = lk.base_model.model.lm_head
    assert (type(head).__name__ == "TokenWrapper") is tie  # a tied head follows the embedding's rows
    _perturb(p, lk)
    keys = sorted(lorakit.get_peft_model_state_dict(lk))
    assert keys == sorted(peft.get_peft_model_state_dict(p))
    assert [k for k in keys if "token" in k] == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    for m in (p, lk):
        opt = torch.optim.SGD([t for t in m.parameters() if t.requires_grad], lr=0.5)
        for _ in range(3):
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    torch.testing.assert_close(lk(input_ids=ids).logits, p(input_ids=ids).logits, rtol=0, atol=1e-5)
    emb = lk.base_model.model.model.embed_tokens.token_adapter.base_layer
    assert torch.equal(emb.weight, base.model.embed_tokens.weight)  # the base embedding never trains
    a = p.merge_and_unload()(input_ids=ids).logits
    b = lk.merge_and_unload()(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


@pytest.mark.parametrize("direction", ["peft_to_lorakit", "lorakit_to_peft"])
def test_files_load_both_ways(direction, tmp_path):
    base = EmbMLP()
    p, lk = _pair(base, target_modules=["lin0"], trainable_token_indices={"emb": ROWS})
    _perturb(p, lk)
    src = p if direction == "peft_to_lorakit" else lk
    src.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == ["base_model.model.emb.token_adapter.trainable_tokens_delta",
                    "base_model.model.lin0.lora_A.weight", "base_model.model.lin0.lora_B.weight"]
    loader = lorakit.PeftModel if direction == "peft_to_lorakit" else peft.PeftModel
    loaded = loader.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(IDS), src(IDS), rtol=0, atol=1e-6)


def test_merge_unmerge_and_unload_restore_the_base():
    base = EmbMLP()
    p, lk = _pair(base, target_modules=["lin0"], trainable_token_indices={"emb": ROWS})
    _perturb(p, lk)
    out = lk(IDS)
    lk.merge_adapter()
    W = lk.base_model.model.emb.token_adapter.base_layer.weight
    torch.testing.assert_close(W[ROWS], _rows(lk)["default"])
    torch.testing.assert_close(lk(IDS), out, rtol=0, atol=1e-6)
    lk.unmerge_adapter()
    assert torch.equal(W, base.emb.weight)
    with lk.disable_adapter():
        torch.testing.assert_close(lk(IDS), base(IDS))
    plain = lk.merge_and_unload()
    assert type(plain.emb) is nn.Embedding
    torch.testing.assert_close(plain(IDS), out, rtol=0, atol=1e-6)


def test_two_adapters_switch_delete_and_refuse_overlapping_merges():
    base = EmbMLP()
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(target_modules=["lin0"],
                                                                        trainable_token_indices={"emb": [1, 2]}))
    lk.add_adapter("b", lorakit.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [2, 5]}))
    rows = _rows(lk)
    with torch.no_grad():
        rows["default"].fill_(1.0)
        rows["b"].fill_(-1.0)
    assert rows["default"].requires_grad and not rows["b"].requires_grad
    first = lk(IDS)
    lk.set_adapter("b")
    assert rows["b"].requires_grad and not rows["default"].requires_grad
    assert not torch.allclose(lk(IDS), first)
    lk.merge_adapter(["default"])
    with pytest.raises(LorakitError, match="Only disjunct token indices"):
        lk.merge_adapter(["b"])  # row 2 belongs to both
    lk.unmerge_adapter()
    lk.delete_adapter("default")
    assert set(rows) == {"b"} and set(lk.base_model.model.emb.token_adapter.trainable_tokens_original) == {"b"}


@pytest.mark.parametrize("kw, message", [
    (dict(trainable_token_indices={"emb": ["a"]}), "trainable_token_indices must be"),
    (dict(trainable_token_indices={"emb": [30]}), "outside this embedding's 30 rows"),
    (dict(trainable_token_indices={"nope": [1]}), "matches no module"),
    (dict(trainable_token_indices={"emb": [1]}, modules_to_save=["emb"]), "already marked to be trained fully"),
])
def test_bad_indices_are_lorakit_errors(kw, message):
    with pytest.raises(LorakitError, match=message):
        lorakit.get_peft_model(EmbMLP(), lorakit.LoraConfig(target_modules=["lin0"], **kw))


def test_run_config_key_reaches_the_lora_config(tmp_path):
    from lorakit.train.config import load_run, lora_config
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata:\n  train: t.jsonl\nlora:\n  trainable_token_indices: [95, 96]\n")
    assert lora_config(load_run(path)).trainable_token_indices == [95, 96]
    with pytest.raises(LorakitError, match="lora.trainable_token_indices"):
        load_run(path, overrides=["lora.trainable_token_indices=oops"])


def test_mixed_adapter_batches_refuse_trainable_tokens():
    lk = lorakit.get_peft_model(EmbMLP(), lorakit.LoraConfig(target_modules=["lin0"],
                                                             trainable_token_indices={"emb": [1]}))
    with pytest.raises(LorakitError, match="trainable_token_indices"):
        lk(IDS, adapter_names=["default", "__base__"])


def test_combining_refuses_trainable_tokens_and_kasa():
    from peft.tuners.lora.config import KasaConfig
    lk = lorakit.get_peft_model(EmbMLP(), lorakit.LoraConfig(target_modules=["lin0"],
                                                             trainable_token_indices={"emb": [1]}))
    lk.add_adapter("b", lorakit.LoraConfig(target_modules=["lin0"], trainable_token_indices={"emb": [2]}))
    with pytest.raises(LorakitError, match="trainable tokens"):
        lk.add_weighted_adapter(["default", "b"], [1.0, 1.0], "both", combination_type="linear")
    kasa = lorakit.get_peft_model(EmbMLP(), lorakit.LoraConfig(target_modules=["lin0"], r=2, kasa_config=KasaConfig()))
    kasa.add_adapter("b", lorakit.LoraConfig(target_modules=["lin0"], r=2, kasa_config=KasaConfig()))
    with pytest.raises(LorakitError, match="KaSA"):
        kasa.add_weighted_adapter(["default", "b"], [1.0, 1.0], "both", combination_type="linear")


def test_state_dict_keys_are_peft_s():
    p, lk = _pair(EmbMLP(), target_modules=["lin0"], trainable_token_indices={"emb": ROWS})
    ours = {k.removesuffix(".weight") for k in lk.state_dict()}
    assert ours == {k.removesuffix(".weight") for k in p.state_dict()}
    assert "base_model.model.emb.token_adapter.trainable_tokens_original.default" in dict(lk.named_buffers())
