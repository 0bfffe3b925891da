"""The trainer on a tiny model: it learns, resumes exactly, handles SIGTERM and NaN, and its loss is exact."""

import contextlib
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LorakitError
from lorakit.data import batching
from lorakit.eval.losses import token_loss_sum
from lorakit.train import NonFiniteLoss, load_run, loop, train

from conftest import run_config as _cfg


def test_train_end_to_end_learns_and_writes_everything(tiny_model_dir, data_file, tmp_path):
    cfg = _cfg(tiny_model_dir, data_file, tmp_path, "train.max_steps=24", f"data.eval={data_file}",
               "train.eval_every=12")
    result = train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert result.steps == 24 and result.stopped == "done"
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.15, losses  # it learns (10.86 -> ~10.55 here)
    for name in ("adapter_config.json", "adapter_model.safetensors", "run.yaml", "loss.png"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    import peft
    from transformers import AutoModelForCausalLM
    peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path)
    assert load_run(tmp_path / "run.yaml").lora.r == 4  # the resolved config reloads


def _interrupt_at(monkeypatch, step):
    """Send ourselves SIGTERM during micro-step `step`, as a scheduler would."""
    real, calls = loop.accumulate, {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, "accumulate", wrapped)


def test_sigterm_checkpoints_and_resume_equals_uninterrupted(tiny_model_dir, data_file, tmp_path, monkeypatch):
    extra = ["train.max_steps=10", "lora.dropout=0.1", "train.grad_accum=2"]  # dropout: RNG must resume too
    straight = train(_cfg(tiny_model_dir, data_file, tmp_path / "a", *extra), progress=False)
    _interrupt_at(monkeypatch, 4)
    cut = train(_cfg(tiny_model_dir, data_file, tmp_path / "b", *extra), progress=False)
    assert cut.stopped == "interrupted" and cut.steps == 4
    assert (tmp_path / "b/checkpoints/step-000004/optimizer.pt").exists()
    monkeypatch.undo()
    resumed = train(_cfg(tiny_model_dir, data_file, tmp_path / "b", *extra), resume=True, progress=False)
    assert resumed.steps == straight.steps == 10
    a = load_file(tmp_path / "a/adapter_model.safetensors")
    b = load_file(tmp_path / "b/adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))  # the log has no duplicated steps after resume


@pytest.mark.parametrize("pack", [False, True])
def test_flat_batches_train_the_same_adapter(tiny_model_dir, data_file, tmp_path, monkeypatch, pack):
    """train.flat_batches (on by default) changes what is computed (no padding), not what is learned."""
    seen = []
    collate = batching.collate
    monkeypatch.setattr(batching, "collate", lambda *a, **k: seen.append(k.get("flat", a[3:4]))
                        or collate(*a, **k))
    extra = ["train.max_steps=6", "train.grad_accum=2", f"data.pack={str(pack).lower()}"]
    results = [train(_cfg(tiny_model_dir, data_file, tmp_path / str(flat), *extra, f"train.flat_batches={flat}"),
                     progress=False) for flat in ("true", "false")]
    assert results[0].tokens == results[1].tokens  # real tokens only, both ways (packed rows' pad tails too)
    a, b = (load_file(tmp_path / f"{flat}/adapter_model.safetensors") for flat in ("true", "false"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k
    assert seen[0] == (True,) and seen[-1] == (False,)  # the switch really switched


def test_resume_without_checkpoint_is_a_clear_error(tiny_model_dir, data_file, tmp_path):
    with pytest.raises(LorakitError, match="no checkpoint"):
        train(_cfg(tiny_model_dir, data_file, tmp_path, "train.max_steps=2"), resume=True, progress=False)


def test_nan_loss_stops_with_a_clear_message(tiny_model_dir, data_file, tmp_path, monkeypatch):
    real, calls = loop.token_loss_sum, {"n": 0}

    def poisoned(model, batch, fused=True):
        calls["n"] += 1
        loss, n = real(model, batch, fused)
        return (loss * float("nan"), n) if calls["n"] >= 3 else (loss, n)
    monkeypatch.setattr(loop, "token_loss_sum", poisoned)
    with pytest.raises(NonFiniteLoss, match="loss became nan at step 3.*lower train.learning_rate"):
        train(_cfg(tiny_model_dir, data_file, tmp_path, "train.max_steps=5", "train.save_every=1"), progress=False)
    good = load_file(tmp_path / "checkpoints/step-000002/adapter_model.safetensors")
    assert all(torch.isfinite(v).all() for v in good.values())


def test_fused_loss_equals_plain_loss_and_gradients(tiny_model_dir):
    """The fast path (label-only logits, fused cross-entropy) gives the plain path's loss and gradients."""
    import lorakit
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :5] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    results = []
    for fused in (True, False):
        model.zero_grad()
        loss, n = token_loss_sum(model, batch, fused=fused)
        (loss / n).backward()
        results.append((loss.item() / n, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (l1, g1), (l2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert l1 == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def _adapter_grads(model, batch, lean: bool = False) -> tuple[float, dict]:
    from lorakit.layers import recompute
    model.zero_grad()
    with recompute.rebuilt_activations() if lean else contextlib.nullcontext():  # lean: as the trainer's step
        loss, n = token_loss_sum(model, batch)
    (loss / n).backward()
    return loss.item() / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("switch", ["gradient_checkpointing", pytest.param("compile", marks=pytest.mark.slow)])
def test_speed_switches_keep_loss_and_gradients(switch):
    """Per-layer gradient checkpointing (with the trainer's rebuilt activations around it) and per-layer
    torch.compile change speed and memory, not numbers."""
    import lorakit
    from conftest import tiny_llama
    model = tiny_llama(layers=2)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    loss_ref, grads_ref = _adapter_grads(model, batch)
    if switch == "compile":
        assert lorakit.compile_layers(model) == 2
    else:
        lorakit.enable_checkpointing(model)
    loss, grads = _adapter_grads(model, batch, lean=switch != "compile")
    if switch == "compile":  # really compiled, not silently run eagerly
        from torch._dynamo.utils import counters
        assert counters["stats"]["unique_graphs"] >= 1
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    assert grads.keys() == grads_ref.keys()
    for k in grads:
        assert torch.allclose(grads[k], grads_ref[k], rtol=1e-4, atol=1e-6), k


def test_trainable_token_rows_train_and_load_in_peft(tiny_model_dir, data_file, tmp_path):
    """lora.trainable_token_indices: the chat template's special tokens (<|im_start|> 1, <|im_end|> 2) learn their
    embedding rows (tied to the head in this model) next to the LoRA factors; PEFT loads the adapter."""
    result = train(_cfg(tiny_model_dir, data_file, tmp_path, "train.max_steps=4",
                        "lora.trainable_token_indices=[1, 2]"), progress=False)
    assert result.steps == 4
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    rows = tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    import peft
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert rows.shape == (2, base.config.hidden_size)
    assert not torch.allclose(rows, base.model.embed_tokens.weight[[1, 2]])  # the rows learned
    model = peft.PeftModel.from_pretrained(base, tmp_path)
    assert torch.equal(model.base_model.model.lm_head.weight[[1, 2]], rows)  # the tied head follows them
