"""PeftModel / LoraModel behave as PEFT's where users can see it: defaults, enums, modes, messages."""

import json
import warnings

import peft
import pytest
import torch
import yaml

import lorakit
from conftest import tiny_gpt2, tiny_llama

warnings.filterwarnings("ignore")


@pytest.mark.parametrize("make,expected", [(tiny_llama, ["q_proj", "v_proj"]), (tiny_gpt2, ["c_attn"])])
def test_default_target_modules_are_peft_s(make, expected):
    theirs = peft.get_peft_model(make(), peft.LoraConfig())
    ours = lorakit.get_peft_model(make(), lorakit.LoraConfig())
    assert ours.targeted_module_names == theirs.targeted_module_names
    assert sorted(ours.peft_config["default"].target_modules) == sorted(expected)


def test_enums_compare_as_strings_and_are_written_as_strings(tmp_path):
    cfg = lorakit.LoraConfig(task_type="causal_lm", target_modules=["q_proj"])
    assert cfg.task_type is lorakit.TaskType.CAUSAL_LM and cfg.task_type == "CAUSAL_LM"
    assert cfg.peft_type.value == "LORA" and cfg.peft_type == peft.PeftType.LORA
    written = json.loads(cfg.save(tmp_path).read_text())
    assert written["task_type"] == "CAUSAL_LM" and written["peft_type"] == "LORA"
    assert peft.LoraConfig.from_pretrained(tmp_path).task_type == "CAUSAL_LM"


def test_second_biased_adapter_is_refused():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], bias="all"))
    model.add_adapter("plain", lorakit.LoraConfig(target_modules=["q_proj"]))  # one biased adapter is fine
    with pytest.raises(ValueError, match="only one adapter"):
        model.add_adapter("other", lorakit.LoraConfig(target_modules=["q_proj"], bias="lora_only"))


def test_merge_twice_warns_and_delete_messages_are_peft_s():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    model.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
        model.delete_adapter("default")
    assert "default" in model.peft_config and model.base_model.model.model.layers[0].self_attn.q_proj.merged_adapters
    with pytest.raises(ValueError, match="Adapter nope does not exist"):
        model.delete_adapter("nope")


def test_lora_model_switches_and_from_pretrained_mode(tmp_path):
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    ids = torch.tensor([[1, 2, 3]])
    base = model.get_base_model()
    model.eval()
    with_adapter = model(ids).logits
    model.base_model.disable_adapter_layers()
    assert not model.has_active_enabled_adapter
    with model.disable_adapter():
        plain = model(ids).logits
    assert torch.equal(model(ids).logits, plain) and not torch.allclose(plain, with_adapter)
    model.base_model.enable_adapter_layers()
    assert model.has_active_enabled_adapter and torch.equal(model(ids).logits, with_adapter)
    assert model.prefix == "lora_" and model.base_model.model is base
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["library_name"] == "peft" and "lora" in meta["tags"] and "pipeline_tag" not in meta
    cfg = lorakit.LoraConfig(target_modules=["q_proj"])
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path, config=cfg)
    assert not loaded.training and loaded.peft_config["default"] is cfg and cfg.inference_mode
    assert torch.equal(loaded(ids).logits, with_adapter)
    result = loaded.load_adapter(tmp_path, adapter_name="other")
    assert result.missing_keys == [] and result.unexpected_keys == []
    model.save_pretrained(tmp_path / "pickle", safe_serialization=False)  # PEFT's adapter_model.bin
    assert not (tmp_path / "pickle" / "adapter_model.safetensors").exists()
    assert torch.equal(lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "pickle")(ids).logits, with_adapter)


def test_autocast_adapter_dtype_false_keeps_the_base_dtype(tmp_path):
    base = tiny_llama().to(torch.bfloat16)
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["q_proj"]), autocast_adapter_dtype=False)
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["q_proj"]), autocast_adapter_dtype=False)
    assert {p.dtype for n, p in model.named_parameters() if "lora_" in n} == {torch.bfloat16}
    model.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama().to(torch.bfloat16), tmp_path, autocast_adapter_dtype=False)
    assert {p.dtype for n, p in loaded.named_parameters() if "lora_" in n} == {torch.bfloat16}
