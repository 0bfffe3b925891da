"""Adapters on a base that accelerate offloads (device_map + max_memory): same numbers as in memory."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.errors import LorakitError


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """4 layers of ~150 KB each: a 400 KB CPU budget keeps the embeddings and one layer, the rest goes to disk."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("offload-base")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def pair(path):
    """(offloaded, in memory), each with the same random adapter (B nonzero) on every linear layer."""
    models = [AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory={"cpu": "400KB"},
                                                   offload_folder=str(path / "offload")),
              AutoModelForCausalLM.from_pretrained(path)]
    for m in models:
        torch.manual_seed(1)
        lorakit.add_adapter(m, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return models


def test_the_adapter_lives_on_the_compute_device_and_matches_in_memory(checkpoint):
    offloaded, ref = pair(checkpoint)
    assert "disk" in offloaded.hf_device_map.values()  # really offloaded, so the test means something
    metas = [n for n, p in offloaded.named_parameters() if p.is_meta]
    assert metas and all("lora_" not in n for n in metas)
    assert all(p.device.type == "cpu" for n, p in offloaded.named_parameters() if "lora_" in n)
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    for m in (offloaded, ref):
        m.train()
        m(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for n, p in offloaded.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(offloaded.eval()(ids).logits, ref.eval()(ids).logits, atol=1e-6, rtol=0)


def test_merging_into_an_offloaded_weight_is_refused_with_the_fix(checkpoint):
    offloaded, _ = pair(checkpoint)
    with pytest.raises(LorakitError, match="offloaded base weight.*without disk offload"):
        lorakit.merge_and_unload(offloaded)
