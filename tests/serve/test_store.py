"""The tiered adapter store on a real server: folders added or changed while serving, broken folders,
eviction under memory pressure; and the store's parts (host LRU in bytes, sizes, the loader)."""

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from lorakit.errors import LorakitError
from lorakit.serve.registry import parse_bytes, parse_resident
from lorakit.serve.store import HostCache, Read, fingerprint
from serving import ADAPTERS, adapters_dir, random_adapter, start_server  # noqa: F401  (fixtures)


def ask(s, model, prompt="The sky"):
    return s.client("k").completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0).choices[0].text


@pytest.fixture(scope="module")
def watched(tmp_path_factory, tiny_model_dir, adapters_dir):
    """A server over a folder it rescans every 0.2 s; each test adds its own adapters."""
    root = tmp_path_factory.mktemp("watched") / "adapters"
    root.mkdir()
    shutil.copytree(adapters_dir / "a0", root / "first")
    s = start_server(tiny_model_dir, root, api_key="k", max_loaded=2, max_model_len=128, rescan_s=0.2)
    yield s, root
    s.stop()


def test_folder_added_while_serving_is_served(watched, adapters_dir):
    s, root = watched
    with pytest.raises(openai.NotFoundError):
        ask(s, "late")
    shutil.copytree(adapters_dir / "a3", root / "late")
    assert ask(s, "late") != ask(s, "first")  # served at once (looked up on use), with its own weights
    deadline = time.time() + 10
    while "late" not in [m.id for m in s.client("k").models.list().data] and time.time() < deadline:
        time.sleep(0.1)
    assert "late" in [m.id for m in s.client("k").models.list().data]  # the rescan lists it
    shutil.rmtree(root / "late")
    with pytest.raises(openai.NotFoundError):  # a removed folder is gone at once
        ask(s, "late")


def test_changed_folder_is_served_with_its_new_weights(watched, tiny_model_dir):
    s, root = watched
    random_adapter(tiny_model_dir, root / "moving", seed=21)
    old = ask(s, "moving")
    random_adapter(tiny_model_dir, root / "moving", seed=22)  # rewritten in place (atomic writes: new files)
    new = ask(s, "moving")  # no rescan needed: the fingerprint is checked on use
    shutil.copytree(root / "moving", root / "moving-copy")
    assert new != old and new == ask(s, "moving-copy")
    assert ask(s, "moving") == new  # stays on the new version


def test_broken_folder_never_takes_the_server_down(watched):
    s, root = watched
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text((root / "first" / "adapter_config.json").read_text())
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"garbage")
    (root / "badjson").mkdir()
    (root / "badjson" / "adapter_config.json").write_text("{not json")
    c = s.client("k")
    for model in ("broken", "broken"):  # the second one from the remembered failure
        with pytest.raises(openai.BadRequestError) as e:
            ask(s, model)
        assert e.value.body["param"] == "model" and "safetensors" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError, match="not valid JSON"):  # never listed, the reason named
        c.chat.completions.create(model="badjson", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # a known failure: refused before the stream starts
        c.completions.create(model="broken", prompt="x", max_tokens=3, stream=True)
    assert ask(s, "first") and ask(s, "tiny")  # everything else keeps working
    assert c.models.list().data and s.engine._thread.is_alive()
    shutil.rmtree(root / "broken")
    shutil.copytree(root / "first", root / "broken")  # repaired: served again
    assert ask(s, "broken") == ask(s, "first")


def test_eviction_under_memory_pressure_keeps_greedy_answers(tiny_model_dir, adapters_dir):
    """Two adapters resident, host cache for one: every answer equals the all-resident server's."""
    one = fingerprint(adapters_dir / "a0")[1][1]  # the weights file's size ~ one adapter's tensor bytes
    tight = start_server(tiny_model_dir, adapters_dir, max_loaded=2, host_cache_bytes=one, max_model_len=128)
    roomy = start_server(tiny_model_dir, adapters_dir, max_loaded=16, max_model_len=128)
    try:
        jobs = [((["tiny"] + ADAPTERS)[i % 9], f"Tell me about {w}") for i, w in enumerate("abcdefghijklmnopqr")]
        run = lambda s: lambda job: ask(s, *job)
        with ThreadPoolExecutor(9) as pool:
            pressed = list(pool.map(run(tight), jobs))
        with ThreadPoolExecutor(9) as pool:
            relaxed = list(pool.map(run(roomy), jobs))
        assert pressed == relaxed
        reg = tight.engine.registry
        assert len(reg.resident) <= 2 and reg.host.peak <= one
        assert reg.attaches > 8  # really evicted and re-read
    finally:
        tight.stop()
        roomy.stop()


def test_host_cache_is_bounded_in_bytes():
    import torch
    cache = HostCache(capacity=3000)
    item = lambda n: Read(None, {"w": torch.zeros(n // 4)}, ("v",), n)
    for k in range(5):
        cache.put(f"a{k}", item(1000))
        assert cache.bytes <= 3000
    assert [cache.get(f"a{k}", ("v",)) is not None for k in range(5)] == [False, False, True, True, True]
    assert cache.get("a4", ("other version",)) is None
    cache.put("huge", item(4000))  # bigger than the budget: not kept
    assert cache.get("huge", ("v",)) is None and cache.bytes <= 3000 and cache.peak <= 3000


def test_sizes():
    assert parse_bytes("512MB") == 512_000_000 and parse_bytes("2GiB") == 2 << 30 and parse_bytes("1024") == 1024
    assert parse_resident("64") == (64, None) and parse_resident("256MiB") == (None, 256 << 20)
    for bad in ("lots", "-1", "12 parsecs"):
        with pytest.raises(LorakitError, match="not a size"):
            parse_bytes(bad)
    with pytest.raises(LorakitError, match="at least 1"):
        parse_resident("0")
