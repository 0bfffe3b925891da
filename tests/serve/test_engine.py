"""The serving engine: greedy tokens equal plain `generate` per request, whatever else is in the batch."""

import logging
import threading
import time

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.errors import LorakitError
from lorakit.layers import BASE, bgmv
from lorakit.serve.engine import Engine, Request
from lorakit.serve.registry import Registry
from lorakit.serve.sampling import SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "embed_tokens"]


class Tok:
    """Enough of a tokenizer for the engine: ids as space-separated numbers."""
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def saved_adapters(tmp_path, names):
    """Random (non-zero B) adapters on every linear layer and the embeddings, saved as folders."""
    for k, name in enumerate(names):
        model = tiny_llama()
        cfg = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        torch.manual_seed(100 + k)
        lorakit.add_adapter(model, cfg, name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        lorakit.save_adapter(model, tmp_path / name, name)
    return tmp_path


def reference(adapter_dir, name, prompt, n):
    model = tiny_llama()
    if name != BASE:
        lorakit.load_adapter(model, adapter_dir / name)
    model.generation_config.eos_token_id = None  # fixed lengths, as the engine under test (eos = {})
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def collect(store, key):
    """A sink that adds up the deltas; the last one, with the whole text, lands in store[key]."""
    parts = []
    def sink(delta):
        parts.append(delta.text)
        if delta.finish_reason is not None:
            delta.text = "".join(parts)
            store[key] = delta
    return sink


def run_all(engine, requests):
    done = {}
    for i, (name, prompt, n) in enumerate(requests):
        sink = collect(done, i)
        engine.submit(Request(prompt, name, SamplingParams(max_tokens=n, temperature=0), sink))
    while len(done) < len(requests):
        engine.step()
    return done


@pytest.fixture
def setup(tmp_path):
    folder = saved_adapters(tmp_path, ["a", "b", "c"])
    model = tiny_llama()
    registry = Registry(model, folder, "tiny", max_loaded=2)
    engine = Engine(model, Tok(), registry, max_batch_tokens=16)
    engine.eos = set()  # compare fixed lengths
    return folder, model, engine


def prompts(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 96, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(k)]


def test_mixed_batch_greedy_equals_generate(setup):
    folder, model, engine = setup
    names = [BASE, "a", "b", "c"]
    reqs = [(names[i % 4], p, 6 + i % 3) for i, p in enumerate(prompts(10))]
    done = run_all(engine, reqs)  # 3 adapters with max_loaded=2: evictions and reloads on the way
    for i, (name, prompt, n) in enumerate(reqs):
        want = " ".join(map(str, reference(folder, name, prompt, n)))
        assert done[i].text == want, (i, name)
        assert done[i].finish_reason == "length" and done[i].completion_tokens == n
    assert len(engine.registry.resident) <= 2
    assert not engine.running and not engine.waiting


def test_alone_matches_generate_logits(setup):
    folder, model, engine = setup
    prompt = prompts(1, seed=3)[0]
    ref = tiny_llama()
    lorakit.load_adapter(ref, folder / "a")
    got = []
    hook = engine.model.register_forward_hook(lambda m, a, out: got.append(out.logits[0, -1].clone()))
    try:
        run_all(engine, [("a", prompt, 4)])
    finally:
        hook.remove()
    ref.generation_config.eos_token_id = None
    out = ref.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, pad_token_id=0,
                       output_logits=True, return_dict_in_generate=True)
    for mine, theirs in zip(got, out.logits):
        torch.testing.assert_close(mine, theirs[0], atol=1e-5, rtol=0)  # not bitwise here (see docs)


def test_same_prompt_two_adapters_and_chunked_prefill(setup):
    folder, model, engine = setup
    engine.budget = 5  # prompts of 19 tokens go in 4 chunks
    prompt = prompts(1, seed=7)[0] * 2
    done = run_all(engine, [("a", prompt, 5), ("b", prompt, 5), (BASE, prompt, 5)])
    texts = [done[i].text for i in range(3)]
    assert texts == [" ".join(map(str, reference(folder, n, prompt, 5))) for n in ("a", "b", BASE)]
    assert len(set(texts)) == 3


def test_cancel_frees_kv_and_bad_adapter_fails_alone(setup, tmp_path):
    folder, model, engine = setup
    (folder / "broken").mkdir()
    (folder / "broken" / "adapter_config.json").write_text((folder / "a" / "adapter_config.json").read_text())
    (folder / "broken" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    engine.registry.scan()
    seen = {}
    keep = Request(prompts(1)[0], "a", SamplingParams(max_tokens=50, temperature=0),
                   lambda d: seen.setdefault("keep", d) if d.finish_reason else None)
    engine.submit(keep)
    engine.submit(Request([1, 2, 3], "broken", SamplingParams(max_tokens=3, temperature=0),
                          lambda d: seen.setdefault("broken", d) if d.finish_reason else None))
    import time
    deadline = time.time() + 30
    while keep.kv.length == 0 and time.time() < deadline:  # its adapter loads on the reader thread
        engine.step()
    assert keep.kv.length > 0
    engine.cancel(keep)
    while "keep" not in seen or "broken" not in seen:
        engine.step()
    assert seen["keep"].finish_reason == "cancelled" and keep.kv.nbytes() == 0
    assert seen["broken"].finish_reason == "error" and "safetensors" in seen["broken"].error


def test_seeded_sampling_ignores_the_batch(setup):
    folder, model, engine = setup
    p = prompts(2, seed=5)
    def one(others):
        out = {}
        engine.submit(Request(p[0], "a", SamplingParams(max_tokens=8, temperature=1.0, seed=42),
                              collect(out, "x")))
        for q in others:
            engine.submit(Request(q, "b", SamplingParams(max_tokens=8, temperature=1.0), lambda d: None))
        while "x" not in out or engine.running or engine.waiting:
            engine.step()
        return out["x"].text
    assert one([]) == one(p * 3)


def test_engine_thread_serves_and_drains(setup):
    folder, model, engine = setup
    engine.start()
    done, lock = [], threading.Lock()
    ev = threading.Event()
    for prompt in prompts(4):
        def sink(d):
            if d.finish_reason:
                with lock:
                    done.append(d)
                    if len(done) == 4:
                        ev.set()
        engine.submit(Request(prompt, "a", SamplingParams(max_tokens=5, temperature=0), sink))
    engine.stop(drain=True)
    assert ev.is_set() and all(d.finish_reason == "length" for d in done)


def test_a_request_waits_only_for_its_own_adapter(setup):
    """A slow read of adapter c holds up c's request only; base and a requests finish meanwhile."""
    folder, model, engine = setup
    real = engine.registry.loader._read
    def slow(path):
        if path.name == "c":
            time.sleep(1.5)
        return real(path)
    engine.registry.loader._read = slow
    finished, lock = [], threading.Lock()
    def sink(name):
        def on(d):
            if d.finish_reason:
                with lock:
                    finished.append((name, d.finish_reason))
        return on
    engine.start()
    try:
        engine.submit(Request(prompts(1)[0], "c", SamplingParams(max_tokens=3, temperature=0), sink("c")))
        for name in (BASE, "a", BASE):
            engine.submit(Request(prompts(1, seed=2)[0], name, SamplingParams(max_tokens=3, temperature=0), sink(name)))
        deadline = time.time() + 30
        while len(finished) < 4 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        engine.stop(drain=True)
    assert [n for n, _ in finished][-1] == "c" and len(finished) == 4
    assert all(reason == "length" for _, reason in finished)


def test_hot_adapters_cannot_starve_a_cold_one(tmp_path):
    """One resident slot, always busy with adapter a: b still starts, within about max_wait_s plus one
    request's lifetime (the scheduler stops admitting a once b has waited max_wait_s)."""
    folder = saved_adapters(tmp_path, ["a", "b"])
    engine = Engine(tiny_llama(), Tok(), Registry(tiny_llama(), folder, "tiny", max_loaded=1), max_batch_tokens=64,
                    max_wait_s=0.3)
    engine.model = engine.registry.model
    engine.eos = set()
    done = {}
    def submit(name, key):
        engine.submit(Request(prompts(1, seed=len(done))[0], name, SamplingParams(max_tokens=6, temperature=0),
                              collect(done, key)))
    k = 0
    for _ in range(2):
        submit("a", k)
        k += 1
    while not engine.registry.current.get("a"):
        engine.step()
    submit("b", "b")
    t0 = time.time()
    while "b" not in done and time.time() - t0 < 20:
        if sum(1 for r in engine.running + engine.waiting if r.adapter == "a") < 2:  # a is never idle
            submit("a", k)
            k += 1
        engine.step()
    assert "b" in done and done["b"].finish_reason == "length"
    assert time.time() - t0 < 10


def test_resident_budget_in_bytes(tmp_path):
    from lorakit.adapters.files import read_adapter
    from lorakit.serve.store import nbytes
    folder = saved_adapters(tmp_path, ["a", "b", "c"])
    size = nbytes(read_adapter(folder / "a")[1])
    model = tiny_llama()
    registry = Registry(model, folder, "tiny", max_loaded=None, max_loaded_bytes=int(2.5 * size))
    engine = Engine(model, Tok(), registry, max_batch_tokens=16)
    engine.eos = set()
    reqs = [(["a", "b", "c"][i % 3], p, 4) for i, p in enumerate(prompts(9, seed=11))]
    done = {}
    for i, (name, prompt, n) in enumerate(reqs):
        engine.submit(Request(prompt, name, SamplingParams(max_tokens=n, temperature=0), collect(done, i)))
    while len(done) < len(reqs):
        engine.step()
        assert registry.resident_bytes <= 2.5 * size and len(registry.resident) <= 2
    for i, (name, prompt, n) in enumerate(reqs):
        assert done[i].text == " ".join(map(str, reference(folder, name, prompt, n))), (i, name)
    assert registry.attaches >= 3  # all three attached, never more than two at once: evictions


def test_greedy_ids_take_the_first_maximum_like_torch_argmax():
    from lorakit.serve.engine import greedy_ids
    torch.manual_seed(0)
    logits = torch.randn(6, 1000)
    logits[1, 7] = logits[1, 900] = 50.0  # a tie: the first index wins
    logits[2] = 0.0  # all equal
    assert greedy_ids(logits) == logits.argmax(-1).tolist()
    assert greedy_ids(logits)[1] == 7 and greedy_ids(logits)[2] == 0
    assert greedy_ids(logits.bfloat16()) == logits.bfloat16().float().argmax(-1).tolist()


def test_a_failed_build_falls_back_with_the_reason(monkeypatch, caplog):
    monkeypatch.setattr(bgmv._Built, "tried", False)
    monkeypatch.setattr(bgmv._Built, "module", None)
    monkeypatch.setattr(bgmv._Built, "why", None)

    def no_compiler():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(bgmv, "_build", no_compiler)
    model = tiny_llama()
    with caplog.at_level(logging.WARNING, logger="lorakit.serve"):
        engine = Engine(model, Tok(), Registry(model, None, "tiny"))
    assert engine.kernel is None and "Ninja is required" in bgmv.why_not()
    assert "BGMV kernel" in caplog.text and "lorakit[serve]" in caplog.text
    assert bgmv.load() is None and caplog.text.count("BGMV kernel") == 1  # said once


def test_engine_kernel_setting():
    model = tiny_llama()
    with pytest.raises(LorakitError, match="kernel 'fast' must be"):
        Engine(model, Tok(), Registry(model, None, "tiny"), kernel="fast")
    assert Engine(model, Tok(), Registry(model, None, "tiny"), kernel="off").kernel is None
    assert Engine(model, Tok(), Registry(model, None, "tiny"), lora_path="segments").kernel is None
    half = tiny_llama().to(torch.bfloat16)  # the kernel is fp32 only: not built for a bf16 model
    assert Engine(half, Tok(), Registry(half, None, "tiny")).kernel is None
