"""Mixed-adapter batches (layers/mixed.py, adapters/rows.py): every row equals that row run alone with its adapter, and PEFT.

Both ways of adding the low-rank part are checked: the stacked path (default) and the segment
fallback (forced here by patching mixed.can_stack), on Linear, Conv1D and Embedding layers, with
adapters of different ranks and scalings, adapters that skip some layers, and "__base__" rows.
"""

import contextlib

import pytest
import torch

import lorakit
from lorakit import LoraConfig, LorakitError, adapter_rows
from lorakit.layers import mixed
from conftest import logits, tiny_gpt2, tiny_llama

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"], "gpt2": ["c_attn", "c_fc", "wte"]}
NAMES = ["a", "b", "__base__", "c", "a", "b"]


def with_adapters(kind="llama"):
    """a: r=4; b: r=2 with rsLoRA; c: r=8 on the first target only (absent from the other layers)."""
    model = MODELS[kind]()
    for seed, (name, r, rs, targets) in enumerate([("a", 4, False, TARGETS[kind]), ("b", 2, True, TARGETS[kind]),
                                                   ("c", 8, False, TARGETS[kind][:1])]):
        torch.manual_seed(20 + seed)
        cfg = LoraConfig(r=r, lora_alpha=r + 3, use_rslora=rs, target_modules=targets, init_lora_weights=False)
        lorakit.add_adapter(model, cfg, name)
    return model


def row_alone(model, name, row_ids, **kw):
    if name == "__base__":
        with lorakit.disable_adapters(model):
            return logits(model, row_ids, **kw)
    lorakit.set_adapter(model, name)
    return logits(model, row_ids, **kw)


@pytest.fixture(params=["stacked", "segments"])
def path(request, monkeypatch):
    if request.param == "segments":
        monkeypatch.setattr(mixed, "can_stack", lambda layer, present: False)
    return request.param


@pytest.mark.parametrize("kind", MODELS)
def test_mixed_batch_equals_each_row_alone(kind, path):
    model = with_adapters(kind)
    ids = torch.randint(0, 96, (len(NAMES), 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), adapter_rows(model, NAMES):
        mixed = model(input_ids=ids).logits
        again = model(input_ids=ids).logits  # cached stack / gathered factors
    for i, name in enumerate(NAMES):
        alone = row_alone(model, name, ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=0, msg=f"row {i} ({name})")
        torch.testing.assert_close(again[i:i + 1], alone, atol=1e-5, rtol=0)


def test_greedy_generate_equals_per_row_generation(path, tmp_path):
    """PeftModel.generate(adapter_names=...) with left padding and the KV cache, vs one row at a time."""
    for n in "abc":
        lorakit.save_adapter(with_adapters("llama"), tmp_path / n, n)
    wrapped = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    for n in "bc":
        wrapped.load_adapter(tmp_path / n, adapter_name=n)
    base = wrapped.get_base_model()
    ids = torch.randint(1, 96, (4, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    for i, pad in enumerate([0, 3, 1, 5]):  # left padding
        ids[i, :pad], mask[i, :pad] = 0, 0
    names = ["b", "a", "__base__", "c"]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = wrapped.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw)
        for i, name in enumerate(names):  # one row at a time, the plain (non-routed) forward
            if name != "__base__":
                lorakit.set_adapter(base, name)
            with lorakit.disable_adapters(base) if name == "__base__" else contextlib.nullcontext():
                alone = base.generate(input_ids=ids[i:i + 1], attention_mask=mask[i:i + 1], **kw)
            assert torch.equal(mixed[i:i + 1], alone), f"row {i} ({name})"


def test_mixed_batch_equals_peft_adapter_names(tmp_path):
    import peft

    model = with_adapters("llama")
    for n in "abc":
        lorakit.save_adapter(model, tmp_path / n, n)
    pm = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    for n in "bc":
        pm.load_adapter(tmp_path / n, adapter_name=n)
    ids = torch.randint(0, 96, (len(NAMES), 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), adapter_rows(model, NAMES):
        ours = model(input_ids=ids).logits
    theirs = logits(pm, ids, adapter_names=NAMES)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_stack_follows_weight_changes_and_new_adapters():
    model = with_adapters("llama")
    ids = torch.randint(0, 96, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["a", "b", "a"]
    with torch.no_grad(), adapter_rows(model, names):
        before = model(input_ids=ids).logits
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["a"].mul_(2.0)  # in place: the version counter moves
    with torch.no_grad(), adapter_rows(model, names):
        after = model(input_ids=ids).logits
    assert not torch.allclose(before[0], after[0], atol=1e-4) and torch.allclose(before[1], after[1], atol=1e-6)
    torch.testing.assert_close(after[0:1], row_alone(model, "a", ids[0:1]), atol=1e-5, rtol=0)
    torch.manual_seed(5)
    lorakit.add_adapter(model, LoraConfig(r=3, target_modules=["k_proj", "q_proj"], init_lora_weights=False), "d")
    lorakit.delete_adapter(model, "b")
    with torch.no_grad(), adapter_rows(model, ["d", "a", "d"]):
        mixed = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0:1], row_alone(model, "d", ids[0:1]), atol=1e-5, rtol=0)


def test_gradients_flow_through_mixed_batches():
    """With trainable adapters the segment path runs; gradients equal those of the rows run alone."""
    model = with_adapters("llama")
    lorakit.set_adapter(model, ["a", "b"])  # both trainable
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(6))
    with adapter_rows(model, ["a", "b"]):
        model(input_ids=ids, labels=ids).logits.sum().backward()
    layer = model.model.layers[0].self_attn.q_proj
    mixed = {n: layer.lora_B[n].grad.clone() for n in "ab"}
    model.zero_grad()
    for i, n in enumerate("ab"):
        lorakit.set_adapter(model, n)
        model(input_ids=ids[i:i + 1]).logits.sum().backward()
        torch.testing.assert_close(layer.lora_B[n].grad, mixed[n], atol=1e-5, rtol=1e-5)


def test_two_threads_with_different_row_plans_on_one_model():
    """The row plan is per call: two threads running mixed batches of different plans (and batch sizes)
    on one model at once each get the logits of their rows run alone. A barrier in the first decoder
    layer holds both forwards half-way, so each runs its later layers while the other's plan is set."""
    import threading
    model = with_adapters("llama")
    gen = torch.Generator().manual_seed(11)
    jobs = {0: (["a", "b", "__base__"], torch.randint(0, 96, (3, 6), generator=gen)),
            1: (["c", "a"], torch.randint(0, 96, (2, 9), generator=gen))}
    expected = {k: torch.cat([row_alone(model, n, ids[i:i + 1]) for i, n in enumerate(names)])
                for k, (names, ids) in jobs.items()}
    barrier = threading.Barrier(2, timeout=60)
    hook = model.model.layers[0].register_forward_hook(lambda *args: (barrier.wait(), None)[1])
    results, errors = {}, []

    def run(k):
        names, ids = jobs[k]
        try:
            with torch.no_grad(), adapter_rows(model, names):
                results[k] = [model(input_ids=ids).logits for _ in range(3)]
        except Exception as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    hook.remove()
    assert not errors, errors
    for k in jobs:
        for got in results[k]:
            torch.testing.assert_close(got, expected[k], atol=1e-5, rtol=0)


def test_stack_follows_training_with_a_fused_optimizer():
    """torch's fused AdamW changes weights without moving their version counters: a stack of trainable
    adapters must not be reused from before the step."""
    model = with_adapters("llama")  # "c" is the active, trainable adapter
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(12))
    names = ["c", "a"]
    with torch.no_grad(), adapter_rows(model, names):
        before = model(input_ids=ids).logits
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad(), adapter_rows(model, names):
        after = model(input_ids=ids).logits
    assert not torch.allclose(before[0:1], after[0:1], atol=1e-4)
    torch.testing.assert_close(after[0:1], row_alone(model, "c", ids[0:1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(after[1:2], row_alone(model, "a", ids[1:2]), atol=1e-5, rtol=0)


# -- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("names, match", [
    (["a", "nope"], r"non-existing adapter\(s\): nope"),
    ([], "non-empty list"),
    ("a", "non-empty list"),
])
def test_bad_names(names, match):
    with pytest.raises(LorakitError, match=match):
        with adapter_rows(with_adapters("llama"), names):
            pass


def test_length_mismatch():
    model = with_adapters("llama")
    with pytest.raises(LorakitError, match="Length of `adapter_names` .* got 3 and 2 respectively"):
        with adapter_rows(model, ["a", "b", "a"]):
            model(input_ids=torch.zeros(2, 4, dtype=torch.long))


def test_dora_and_merged_adapters_are_refused():
    model = with_adapters("llama")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), "dora")
    with pytest.raises(LorakitError, match="DoRA"):
        with adapter_rows(model, ["a", "dora"]):
            pass
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    with pytest.raises(LorakitError, match="unmerge"):
        with adapter_rows(model, ["a", "b"]):
            pass


# -- convolutions, lora_bias and modules_to_save in mixed batches (PEFT supports them) ------------------

def _conv_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(6 * 25, 4))


@pytest.mark.parametrize("extra", [{}, {"lora_bias": True}])
def test_conv_and_lora_bias_rows_equal_each_row_alone(extra):
    model = _conv_model()
    for name in ("a", "b"):
        lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False, **extra), name)
    model.eval()
    x = torch.randn(5, 3, 5, 5)
    names = ["a", "__base__", "b", "a", "b"]
    with torch.no_grad():
        with adapter_rows(model, names):
            mixed_out = model(x)
        for i, name in enumerate(names):
            with lorakit.disable_adapters(model) if name == "__base__" else contextlib.nullcontext():
                if name != "__base__":
                    lorakit.set_adapter(model, name)
                alone = model(x[i:i + 1])
            torch.testing.assert_close(mixed_out[i:i + 1], alone, rtol=1e-5, atol=1e-6)


def test_modules_to_save_rows_run_their_adapters_copy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    for name in ("a", "b"):
        lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0"], modules_to_save=["2"],
                                              init_lora_weights=False), name)
        with torch.no_grad():  # each adapter's copy of the head differs
            model[2].modules_to_save[name].weight.add_(torch.randn(3, 4))
    x = torch.randn(4, 4)
    names = ["b", "a", "__base__", "b"]
    with torch.no_grad():
        with adapter_rows(model, names):
            mixed_out = model(x)
        expected = []
        for i, name in enumerate(names):
            if name == "__base__":
                with lorakit.disable_adapters(model):
                    expected.append(model(x[i:i + 1]))
            else:
                lorakit.set_adapter(model, name)
                expected.append(model(x[i:i + 1]))
    torch.testing.assert_close(mixed_out, torch.cat(expected), rtol=1e-5, atol=1e-6)


def test_modules_to_save_that_mixes_rows_is_refused_with_a_type_error():
    class WithGRU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin0, self.gru = torch.nn.Linear(4, 4), torch.nn.GRU(4, 4, batch_first=True)

        def forward(self, x):
            return self.gru(self.lin0(x))[0]

    model = WithGRU()
    for name in ("a", "b"):
        lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["lin0"], modules_to_save=["gru"]), name)
    with pytest.raises(TypeError, match="Mixed batching is only supported for the following modules: Linear, "
                                        "Embedding, Conv1d, Conv2d, Conv3d.") as e:
        with torch.no_grad(), adapter_rows(model, ["a", "b"]):
            model(torch.randn(2, 3, 4))
    assert isinstance(e.value, LorakitError)
