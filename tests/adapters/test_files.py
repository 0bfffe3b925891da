"""adapters/files.py: which embedding weights an adapter file carries, and the warnings PEFT gives."""

import warnings

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.adapters import files


class WithEmbeddings(torch.nn.Module):
    """A transformers-like model: it says which module is its input embedding."""

    def __init__(self):
        super().__init__()
        self.embed_tokens, self.lin0 = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4)

    def get_input_embeddings(self):
        return self.embed_tokens

    def get_output_embeddings(self):
        return None


def test_auto_saves_targeted_embeddings_and_says_so():
    model = lorakit.get_peft_model(WithEmbeddings(), LoraConfig(target_modules=["lin0", "embed_tokens"]))
    with pytest.warns(UserWarning, match="Setting `save_embedding_layers` to `True` as embedding layers found"):
        tensors = files.adapter_state_dict(model.get_base_model())
    assert "base_model.model.embed_tokens.base_layer.weight" in tensors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "base_model.model.embed_tokens.base_layer.weight" not in files.adapter_state_dict(
            model.get_base_model(), save_embedding_layers=False)


def test_embeddings_asked_for_on_a_model_that_cannot_name_them_warns():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0"]))
    with pytest.warns(UserWarning, match="Could not identify embedding layer"):
        tensors = files.adapter_state_dict(model, save_embedding_layers=True)
    assert not any(k.endswith("0.base_layer.weight") for k in tensors)
