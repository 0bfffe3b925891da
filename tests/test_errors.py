"""Bad input gets one clear error naming the problem and the fix."""

import json

import pytest
import torch
from safetensors.torch import save_file

import lorakit
from lorakit import LoraConfig, LorakitError
from conftest import tiny_gpt2, tiny_llama


def test_every_config_problem_in_one_message():
    with pytest.raises(LorakitError) as e:
        LoraConfig(r=0, lora_alpha=-1, lora_dropout=1.5, target_modules=["q_proj"], bias="some", lora_rank=3)
    msg = str(e.value)
    for part in ("r must be a positive integer", "lora_alpha must be > 0", "lora_dropout must be in [0, 1)",
                 "bias must be", "unknown field 'lora_rank'"):
        assert part in msg, part


def test_unknown_field_suggests_the_right_name():
    with pytest.raises(LorakitError, match="did you mean 'lora_alpha'"):
        LoraConfig(target_modules=["q_proj"], lora_alpah=16)


def test_missing_target_modules_and_bad_regex():
    with pytest.raises(LorakitError, match="Please specify `target_modules`"):
        lorakit.add_adapter(torch.nn.Sequential(torch.nn.Linear(2, 2)), LoraConfig())  # a plain module has no default targets
    with pytest.raises(LorakitError, match="not a valid regular expression"):
        LoraConfig(target_modules="q_proj(")


def test_unsupported_peft_feature_is_named():
    with pytest.raises(LorakitError, match="init_lora_weights must be one of"):
        LoraConfig(target_modules=["q_proj"], init_lora_weights="olora")
    with pytest.raises(LorakitError, match="use_qalora=True: this PEFT feature is not implemented"):
        LoraConfig(target_modules=["q_proj"], use_qalora=True)


def test_no_module_matched_names_the_closest():
    with pytest.raises(LorakitError) as e:
        lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_prj", "v_projection"]))
    msg = str(e.value)
    assert "matched no module" in msg and "'q_proj'" in msg and "'v_proj'" in msg


def test_pattern_keys_that_match_nothing():
    with pytest.raises(LorakitError, match="rank_pattern key 'gate_prj' matches none"):
        lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"], rank_pattern={"gate_prj": 4}))


def test_unsupported_layer_type_is_named():
    with pytest.raises(LorakitError, match="not a supported layer type"):
        lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["self_attn"]))


def test_unknown_and_duplicate_adapter_names():
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(LorakitError, match="already exists"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(LorakitError, match="no adapter named 'nope'"):
        lorakit.set_adapter(model, "nope")
    with pytest.raises(LorakitError, match="unknown adapter"):
        with lorakit.adapter_rows(model, ["default", "nope"]):
            pass


def _saved(tmp_path, **kw):
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kw))
    lorakit.save_adapter(model, tmp_path)
    return tmp_path


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(LorakitError, match="does not exist"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "nowhere")
    with pytest.raises(LorakitError, match="adapter_config.json not found"):
        lorakit.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")  # read only with torch.load(weights_only=True)
    with pytest.raises(LorakitError, match="not a readable torch.save file.*never unpickles"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_corrupt_safetensors_and_config(tmp_path):
    _saved(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(LorakitError, match="not a readable safetensors file"):
        lorakit.load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 4,\n "target_modules": [q_proj]}')
    with pytest.raises(LorakitError, match=r"adapter_config.json:2: not valid JSON"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_wrong_shapes_missing_keys_and_another_base(tmp_path):
    _saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    from safetensors.torch import load_file
    sd = load_file(path)
    key = next(k for k in sd if k.endswith("q_proj.lora_A.weight"))
    sd[key] = torch.zeros(5, 32)
    dropped = sd.pop(next(k for k in sd if k.endswith("v_proj.lora_B.weight")))
    save_file(sd, path)
    model = tiny_llama()
    with pytest.raises(LorakitError) as e:
        lorakit.load_adapter(model, tmp_path)
    msg = str(e.value)
    assert "shape (5, 32)" in msg and "(4, 32)" in msg and "missing from the file" in msg
    assert not any(isinstance(m, lorakit.LoraLayer) for m in model.modules()), "failed load must leave no trace"
    assert dropped is not None
    with pytest.raises(LorakitError, match="another base model"):
        lorakit.load_adapter(tiny_gpt2(), tmp_path)


def test_shape_mismatch_from_another_base(tmp_path):
    _saved(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(LorakitError, match="another base model or another r"):
        lorakit.load_adapter(wider, tmp_path)


def test_non_lora_peft_type(tmp_path):
    _saved(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["peft_type"] = "IA3"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LorakitError, match="loads only LoRA adapters"):
        lorakit.load_adapter(tiny_llama(), tmp_path)


def test_mixed_batch_length_mismatch(ids):
    model = lorakit.add_adapter(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(LorakitError, match="one adapter name per row"):
        with lorakit.adapter_rows(model, ["default"]):
            model(input_ids=ids)
