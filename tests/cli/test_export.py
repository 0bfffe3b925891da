"""lorakit export: the verb end to end on a tiny Llama with SmolLM2's tokenizer, and its refusals."""

import json

import numpy as np
import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.export.modelfile import modelfile_text

gguf = pytest.importorskip("gguf")


@pytest.fixture
def adapter_dir(tmp_path, tiny_model_dir):
    model, _ = lorakit.load_model(str(tiny_model_dir), device="cpu")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  use_rslora=True))
    with torch.no_grad():
        for _, layer in lorakit.adapters.manage.lora_layers(model):
            layer.lora_B["default"].normal_(0, 0.1)
    out = tmp_path / "adapter"
    lorakit.save_adapter(model, out)
    json.loads((out / "adapter_config.json").read_text())
    return out


def test_adapter_gguf_from_the_command_line(adapter_dir, tmp_path, capsys):
    out = tmp_path / "a.gguf"
    assert main(["export", str(adapter_dir), "--format", "gguf", "--out", str(out)]) == 0
    r = gguf.GGUFReader(str(out))
    assert r.fields["adapter.lora.alpha"].contents() == pytest.approx(16.0)  # 8 * sqrt(4): rsLoRA
    assert {t.name for t in r.tensors} >= {"blk.0.attn_q.weight.lora_a", "blk.1.attn_v.weight.lora_b"}
    assert "--lora" in capsys.readouterr().out


def test_hf_format_is_the_merged_folder(adapter_dir, tmp_path, tiny_model_dir):
    out = tmp_path / "merged"
    assert main(["export", str(adapter_dir), "--format", "hf", "--out", str(out)]) == 0
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out)
    model, _ = lorakit.load_model(str(tiny_model_dir), device="cpu")
    lorakit.load_adapter(model, adapter_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        np.testing.assert_allclose(merged(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)


@pytest.mark.parametrize("flags, words", [
    (["--format", "hf", "--quant", "q8_0"], "--quant applies to --format gguf"),
    (["--format", "gguf", "--quant", "q8_0"], "--quant applies to --merged"),
    (["--format", "gguf", "--merged"], "--base-gguf"),
    (["--format", "gguf", "--ollama"], "--base-gguf"),
])
def test_refusals_name_the_fix(adapter_dir, tmp_path, capsys, flags, words):
    out = tmp_path / "x.gguf"
    assert main(["export", str(adapter_dir), "--out", str(out), *flags]) == 2
    assert words in capsys.readouterr().err and not out.exists()


def test_other_architectures_are_refused(tmp_path, capsys, smol_tokenizer):
    from conftest import tiny_gpt2
    model_dir, adapter = tmp_path / "gpt2", tmp_path / "adapter"
    model = tiny_gpt2()
    model.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    lorakit.add_adapter(model, lorakit.LoraConfig(target_modules=["c_attn"]))
    lorakit.save_adapter(model, adapter)
    assert main(["export", str(adapter), "--format", "gguf", "--model", str(model_dir),
                 "--out", str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err
    assert "llama, mistral, qwen2" in err and "'gpt2'" in err and "--format hf" in err


def test_modelfile_for_a_chatml_model(tmp_path):
    text = modelfile_text(tmp_path, tmp_path / "base.gguf", tmp_path / "a.gguf",
                          "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}")
    lines = text.splitlines()
    assert "FROM ./base.gguf" in lines and "ADAPTER ./a.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and "{{ .Prompt }}<|im_end|>" in text
    assert text.count('"""') == 2
    smol = ("{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful "
            "AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}")
    assert ('SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""'
            in modelfile_text(tmp_path, tmp_path / "m.gguf", None, smol).splitlines())
    other = modelfile_text(tmp_path, "/elsewhere/m.gguf", None, "{{ bos_token }}{{ messages }}")
    assert "FROM /elsewhere/m.gguf" in other and "ADAPTER" not in other and "TEMPLATE" not in other.split("#")[-2]
