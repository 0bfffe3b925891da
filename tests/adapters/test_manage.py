"""Named adapters: save/load round trip, names, delete, switching, and the plain-function API."""

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import LoraConfig
from conftest import logits, tiny_llama

CFG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)


def _with(name="default", seed=1, **kw):
    model = tiny_llama()
    torch.manual_seed(seed)  # after the model: tiny_llama seeds its own init
    return lorakit.add_adapter(model, LoraConfig(**{**CFG, **kw}), name)


@pytest.mark.parametrize("kw", [{}, {"use_dora": True}, {"use_rslora": True}, {"lora_fa": True}])
def test_save_load_round_trip_is_identical(kw, ids, tmp_path):
    model = _with(**kw)
    lorakit.save_adapter(model, tmp_path)
    loaded = lorakit.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded, ids), logits(model, ids))
    assert lorakit.adapters.configs(loaded)["default"].lora_fa == kw.get("lora_fa", False)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    trainable = lorakit.load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_adapter_name_changes_nothing(ids, tmp_path):
    a, b = _with("default"), _with("my-task")
    assert torch.equal(logits(a, ids), logits(b, ids))
    lorakit.save_adapter(a, tmp_path / "a")
    lorakit.save_adapter(b, tmp_path / "b", name="my-task")
    sa, sb = load_file(tmp_path / "a/adapter_model.safetensors"), load_file(tmp_path / "b/adapter_model.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_two_adapters_switch_and_delete_removes_every_trace(ids):
    base = logits(tiny_llama(), ids)
    one = logits(_with(seed=1), ids)
    two = logits(_with(seed=2, r=2), ids)
    model = _with("one", seed=1)
    torch.manual_seed(2)
    lorakit.add_adapter(model, LoraConfig(**{**CFG, "r": 2}), "two", activate=False)
    assert torch.equal(logits(model, ids), one)
    lorakit.set_adapter(model, "two")
    assert torch.equal(logits(model, ids), two)
    # only the active adapter trains
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".two") for n in trainable)
    lorakit.delete_adapter(model, "two")
    assert not any(".two" in n for n, _ in model.named_parameters())
    assert torch.equal(logits(model, ids), one)
    lorakit.delete_adapter(model, "one")
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules())
    assert lorakit.adapters.configs(model) == {}
    assert torch.equal(logits(model, ids), base)
    assert set(model.state_dict()) == set(tiny_llama().state_dict())


def test_peft_style_multi_adapter_api(ids, tmp_path):
    model = lorakit.get_peft_model(tiny_llama(), LoraConfig(**CFG))
    model.add_adapter("other", LoraConfig(**{**CFG, "r": 2}))
    assert model.active_adapter == "default"
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").exists() and (tmp_path / "other/adapter_config.json").exists()
    reloaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    reloaded.load_adapter(tmp_path / "other", adapter_name="other")
    reloaded.set_adapter("other")
    model.set_adapter("other")
    assert torch.equal(logits(reloaded, ids), logits(model, ids))
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), logits(tiny_llama(), ids))
    model.delete_adapter("other")
    assert list(model.peft_config) == ["default"]


def test_mixed_batch_rows_equal_single_adapter_runs(ids):
    model = _with("a", seed=1)
    torch.manual_seed(2)
    lorakit.add_adapter(model, LoraConfig(**{**CFG, "r": 2}), "b", activate=False)
    batch = torch.cat([ids, ids])  # rows: a, b, base, a
    names = ["a", "b", "__base__", "a"]
    with lorakit.adapter_rows(model, names):
        mixed = logits(model, batch)
    lorakit.set_adapter(model, "b")
    only_b = logits(model, batch)
    lorakit.set_adapter(model, "a")
    only_a = logits(model, batch)
    with lorakit.disable_adapters(model):
        base = logits(model, batch)
    for i, expect in enumerate([only_a, only_b, base, only_a]):
        assert torch.allclose(mixed[i], expect[i], atol=1e-5), names[i]


def test_merge_and_unload_output_loads_in_transformers_alone(ids, tmp_path):
    from transformers import AutoModelForCausalLM
    model = _with(use_dora=True)
    expected = logits(model, ids)
    lorakit.merge_and_unload(model).save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.allclose(logits(plain, ids), expected, atol=1e-5)


def test_count_parameters_and_report():
    model = _with()
    trainable, total = lorakit.count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    assert trainable == lora and total == sum(p.numel() for p in model.parameters())
    assert lorakit.trainable_report(model).startswith(f"trainable params: {trainable:,d} || all params: ")


def _deep_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)) for _ in range(3)])


def test_adding_an_adapter_with_modules_to_save_does_not_activate_its_copies():
    model = _deep_mlp()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0.0"]), "default")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0.0"], modules_to_save=["0.1"]), "other",
                        activate=False)
    head = model[0][1]
    assert head.active_adapters == [] and head.modules_to_save["other"].weight.requires_grad is False
    x = torch.randn(2, 4)
    torch.testing.assert_close(head(x), head.original_module(x))  # 'default' is active: the original runs
    lorakit.set_adapter(model, "other")
    assert head.active_adapters == ["other"] and head.modules_to_save["other"].weight.requires_grad is True
    lorakit.set_adapter(model, "default")
    assert head.active_adapters == []


def test_two_active_adapters_may_not_share_a_modules_to_save_module():
    model = _deep_mlp()
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0.0"], modules_to_save=["0.1", "1.1"]), "default")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0.0"], modules_to_save=["2.1", "1.1"]), "other")
    with pytest.raises(lorakit.LorakitError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        lorakit.set_adapter(model, ["default", "other"])
    assert model[0][0].active_adapters == ["other"]  # nothing changed
    distinct = _deep_mlp()
    lorakit.add_adapter(distinct, LoraConfig(r=2, target_modules=["0.0"], modules_to_save=["0.1"]), "default")
    lorakit.add_adapter(distinct, LoraConfig(r=2, target_modules=["0.0"], modules_to_save=["1.1"]), "other")
    lorakit.set_adapter(distinct, ["default", "other"])
    assert distinct[0][1].active_adapters == ["default"] and distinct[1][1].active_adapters == ["other"]
