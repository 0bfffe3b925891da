"""lorakit.models.attention and flat batches (batching.collate(flat=True)): a batch's examples end to end in
one unpadded row give the padded batch's loss and gradients, under every attention path."""

import contextlib

import pytest
import torch

import lorakit
from lorakit import LorakitError
from lorakit.data.batching import IGNORE_INDEX, collate, pack
from lorakit.eval.losses import token_loss_sum
from lorakit.layers import recompute
from lorakit.models import attention

LENGTHS = (9, 5, 14, 3, 11)


def _examples(vocab: int, lengths=LENGTHS) -> list[dict]:
    g = torch.Generator().manual_seed(7)
    out = []
    for n in lengths:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        prompt = n // 2  # loss on the second half only, as a chat answer
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def _model(kind: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config
    small = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
    configs = {
        "llama": lambda: LlamaConfig(**small),
        "llama-eager": lambda: LlamaConfig(**small, attn_implementation="eager"),
        "qwen2": lambda: Qwen2Config(**small),
        "mistral-window4": lambda: MistralConfig(**small, sliding_window=4),  # examples longer than the window
        "gpt2": lambda: GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                   eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[kind]())
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model.train()


def _loss_and_grads(model, batch, flat_attention: bool, lean: bool = True):
    model.zero_grad()
    ctx = attention.flat_attention(model) if flat_attention else contextlib.nullcontext()
    with ctx:  # held over backward too, as the trainer does
        with recompute.rebuilt_activations() if lean else contextlib.nullcontext():
            loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
    return loss.item() / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        scale = grads_a[k].abs().max()
        assert (grads_a[k] - grads_b[k]).abs().max() <= 1e-5 * scale + 1e-8, k


def test_flat_collate_lays_examples_end_to_end():
    plain = _examples(96)
    batch = collate(plain, pad_id=0, flat=True)
    n = sum(LENGTHS)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, n)
    assert batch["cu_seq_lens_q"].tolist() == [0, 9, 14, 28, 31, 42] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 14
    assert batch["position_ids"][0, 9:14].tolist() == list(range(5))
    # each example's first label is dropped (the token before it is another example's), as in pack
    assert all(batch["labels"][0, s] == IGNORE_INDEX for s in (0, 9, 14, 28, 31))
    padded = collate(plain, pad_id=0)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((padded["labels"][:, 1:] != IGNORE_INDEX).sum())
    same = collate(_examples(96, (6, 6, 6)), pad_id=0, flat=True)  # nothing to drop: kept as (B, T)
    assert same["input_ids"].shape == (3, 6) and "cu_seq_lens_q" not in same
    rows = pack(plain, 20)  # packed rows keep their own restarting positions inside the flat row
    flat_rows = collate(rows, pad_id=0, flat=True)
    assert sorted(torch.diff(flat_rows["cu_seq_lens_q"]).tolist()) == sorted(LENGTHS)


@pytest.mark.parametrize("kind", ["llama", "llama-eager", "qwen2", "mistral-window4", "gpt2"])
def test_flat_batch_equals_padded_batch(kind, monkeypatch):
    """Same loss and LoRA gradients as the padded batch: with lorakit's per-example attention, and with
    the model's own attention (transformers builds the block mask from the restarting position ids)."""
    model = _model(kind)
    examples = _examples(model.config.vocab_size)
    assert attention.supports(model)
    padded = _loss_and_grads(model, collate(examples, pad_id=0), flat_attention=False)
    flat = collate(examples, pad_id=0, flat=True)
    calls = []
    one_example = attention._one_example
    monkeypatch.setattr(attention, "_one_example", lambda *a: calls.append(a[0].shape[2]) or one_example(*a))
    _assert_same(_loss_and_grads(model, flat, flat_attention=True), padded)
    assert calls == list(LENGTHS) * 2  # really per example, in each of the 2 layers
    _assert_same(_loss_and_grads(model, flat, flat_attention=False), padded)
    assert len(calls) == 2 * len(LENGTHS)  # outside the context: the model's own attention


def test_flat_attention_under_gradient_checkpointing():
    """Checkpointed layers run their forward again in backward: the flat attention must still hold."""
    model = _model("llama")
    examples = _examples(96)
    padded = _loss_and_grads(model, collate(examples, pad_id=0), flat_attention=False, lean=False)
    lorakit.enable_checkpointing(model)
    _assert_same(_loss_and_grads(model, collate(examples, pad_id=0, flat=True), flat_attention=True, lean=True),
                 padded)


@pytest.mark.slow
def test_flat_attention_in_compiled_layers():
    """train.compile keeps flat batches: the per-example loop is a graph break inside each compiled layer."""
    model = _model("llama")
    examples = _examples(96)
    padded = _loss_and_grads(model, collate(examples, pad_id=0), flat_attention=False, lean=False)
    assert lorakit.compile_layers(model) == 2
    flat = collate(examples, pad_id=0, flat=True)
    _assert_same(_loss_and_grads(model, flat, flat_attention=True, lean=False), padded)
    from torch._dynamo.utils import counters
    assert counters["stats"]["unique_graphs"] >= 1  # really compiled


def test_flat_attention_restores_the_model_and_refuses_a_padded_batch():
    model = _model("llama")
    with pytest.raises(LorakitError, match="flat=True"):
        with attention.flat_attention(model):
            token_loss_sum(model, collate(_examples(96), pad_id=0))
    assert model.config._attn_implementation == "sdpa"
    assert all(m.config._attn_implementation == "sdpa" for m in model.modules() if hasattr(m, "config"))


def test_supports_only_causal_models_on_the_attention_interface():
    from conftest import tiny_bert
    assert attention.supports(_model("llama")) and attention.supports(lorakit.get_peft_model(
        _model("qwen2"), lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="other"))
    assert not attention.supports(tiny_bert())  # attends both ways
