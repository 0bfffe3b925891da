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


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.fixture
def ids():
    return torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(123))
