"""PEFT's state-dict functions on lorakit models give PEFT's keys and values, and load what PEFT wrote."""

import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit
from conftest import ids, logits, tiny_llama  # noqa: F401 - ids is a fixture

warnings.filterwarnings("ignore")
KW = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"])


def _pair(seed=1, **kw):
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**{**KW, **kw}))
    torch.manual_seed(seed)
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**{**KW, **kw}))
    return theirs.eval(), ours.eval()


def test_get_peft_model_state_dict_equals_peft():
    theirs, ours = _pair()
    t, o = peft.get_peft_model_state_dict(theirs), lorakit.get_peft_model_state_dict(ours)
    assert sorted(t) == sorted(o) and all(k.startswith("base_model.model.") for k in o)
    for k in t:
        assert torch.equal(t[k], o[k]), k


def test_set_peft_model_state_dict_loads_peft_tensors(ids):
    theirs, ours = _pair()
    with torch.no_grad():  # other weights until the state dict is set
        for name, p in ours.named_parameters():
            if "lora_" in name:
                p.normal_()
    assert not torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-5)
    result = lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=0)


def test_set_peft_model_state_dict_reports_what_does_not_fit():
    _, ours = _pair()
    state = lorakit.get_peft_model_state_dict(ours)
    dropped = sorted(state)[0]
    state.pop(dropped)
    state["base_model.model.nope.lora_A.weight"] = torch.zeros(1)
    result = lorakit.set_peft_model_state_dict(ours, state)
    assert result.missing_keys == [dropped] and result.unexpected_keys == ["base_model.model.nope.lora_A.weight"]
    wrong = {k: torch.zeros(3, 3) for k in lorakit.get_peft_model_state_dict(ours)}
    with pytest.raises(lorakit.LorakitError, match="ignore_mismatched_sizes"):
        lorakit.set_peft_model_state_dict(ours, wrong)
    skipped = lorakit.set_peft_model_state_dict(ours, wrong, ignore_mismatched_sizes=True)
    assert sorted(skipped.missing_keys) == sorted(wrong)


def test_inject_adapter_in_model_matches_peft(ids):
    torch.manual_seed(3)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**KW), tiny_llama())
    torch.manual_seed(3)
    ours = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**KW), tiny_llama())
    t, o = peft.get_peft_model_state_dict(theirs), lorakit.get_peft_model_state_dict(ours)
    assert sorted(t) == sorted(o) and not any(k.startswith("base_model.") for k in o)
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=0)


def test_base_model_state_dict_has_the_original_names():
    plain = tiny_llama()
    _, ours = _pair()
    base = lorakit.get_base_model_state_dict(ours)
    assert sorted(base) == sorted(plain.state_dict())
    fresh = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in plain.state_dict().items()}
    assert lorakit.set_base_model_state_dict(ours, fresh) == ([], [])
    for k, v in lorakit.get_base_model_state_dict(ours).items():
        assert torch.equal(v, fresh[k]), k
    with pytest.raises(lorakit.LorakitError, match="unexpected key"):
        lorakit.set_base_model_state_dict(ours, {**fresh, "extra.weight": torch.zeros(1)})


def test_modules_to_save_buffers_round_trip(tmp_path):
    """A BatchNorm in modules_to_save keeps its running statistics through save and load."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    cfg = lorakit.LoraConfig(target_modules=["0"], modules_to_save=["1"], init_lora_weights=False)
    model = lorakit.get_peft_model(net(), cfg)
    model.train()
    model(torch.randn(8, 4) * 3 + 1)  # moves the copy's running mean and var
    model.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(net(), tmp_path)
    saved = model.base_model.model[1].modules_to_save["default"]
    again = loaded.base_model.model[1].modules_to_save["default"]
    assert torch.equal(saved.running_mean, again.running_mean) and not torch.equal(
        again.running_mean, torch.zeros(4))
    loaded.delete_adapter("default")  # an adapter with modules_to_save deletes cleanly
    assert not isinstance(loaded.base_model.model[1], lorakit.adapters.ModulesToSave)


@pytest.mark.parametrize("dora", [False, True])
def test_low_cpu_mem_usage_creates_meta_adapters_that_loading_fills(dora, ids):
    """PEFT's low_cpu_mem_usage: the adapter tensors start on the meta device; the state dict fills them."""
    theirs, _ = _pair(use_dora=dora)
    state = {k.removeprefix("base_model.model."): v for k, v in peft.get_peft_model_state_dict(theirs).items()}
    config = lorakit.LoraConfig(**KW, use_dora=dora)
    model = lorakit.inject_adapter_in_model(config, tiny_llama(), low_cpu_mem_usage=True)
    adapter = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert adapter and all(p.is_meta for p in adapter.values())
    assert not any(p.is_meta for n, p in model.named_parameters() if "lora_" not in n)
    with pytest.raises(lorakit.LorakitError, match="low_cpu_mem_usage"):
        logits(model, ids)
    result = lorakit.set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert not any(p.is_meta for p in model.parameters())
    assert all(adapter[n] is p for n, p in model.named_parameters() if "lora_" in n)  # the same objects, filled
    assert all(p.requires_grad for p in adapter.values())
    torch.testing.assert_close(logits(model, ids), logits(theirs, ids), atol=1e-5, rtol=0)
