"""Adapters at run time: load, use, unload, reload a changed folder; safe paths; a bad folder fails alone."""

import os
import shutil

import httpx
import openai
import pytest

from lorakit.errors import LorakitError
from lorakit.serve.registry import inside
from serving import adapters_dir, random_adapter, start_server  # noqa: F401  (fixtures)

ADMIN = {"Authorization": "Bearer root"}


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_model_dir, adapters_dir):
    """One server for the module; each test uses its own folder and adapter names."""
    root = tmp_path_factory.mktemp("live") / "adapters"
    root.mkdir()
    shutil.copytree(adapters_dir / "a0", root / "first")
    s = start_server(tiny_model_dir, root, api_key="secret", admin_key="root", max_loaded=2, max_model_len=128)
    yield s, root
    s.stop()


def ask(s, model, key="secret"):
    return s.client(key).completions.create(model=model, prompt="The sky", max_tokens=8, temperature=0).choices[0].text


def post(s, path, body, headers=ADMIN):
    return httpx.post(s.url + path, json=body, headers=headers, timeout=60)


def test_load_use_unload_reload_changed_folder(live, tiny_model_dir):
    s, root = live
    random_adapter(tiny_model_dir, root / "new", seed=1)
    r = post(s, "/v1/load_lora_adapter", {"lora_name": "dyn", "lora_path": "new"})
    assert r.status_code == 200 and "added successfully" in r.text
    assert "dyn" in [m.id for m in s.client("secret").models.list().data]
    old = ask(s, "dyn")
    assert old != ask(s, "first")  # its own weights
    assert post(s, "/v1/load_lora_adapter", {"lora_name": "dyn", "lora_path": "new"}).status_code == 400
    assert post(s, "/v1/unload_lora_adapter", {"lora_name": "dyn"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        ask(s, "dyn")
    assert post(s, "/v1/unload_lora_adapter", {"lora_name": "dyn"}).status_code == 404
    shutil.rmtree(root / "new")
    random_adapter(tiny_model_dir, root / "new", seed=2)  # the folder changed
    assert post(s, "/v1/load_lora_adapter", {"lora_name": "dyn", "lora_path": "new"}).status_code == 200
    fresh = ask(s, "dyn")
    assert fresh != old
    shutil.copytree(root / "new", root / "check")
    assert post(s, "/v1/load_lora_adapter", {"lora_name": "check", "lora_path": "check"}).status_code == 200
    assert ask(s, "check") == fresh  # the new weights, not a stale copy


def test_admin_key_needed(live):
    s, _ = live
    r = post(s, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "first"}, {"Authorization": "Bearer secret"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert post(s, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "first"}, {}).status_code == 401


def test_paths_cannot_leave_the_folder(live, tmp_path, adapters_dir):
    s, root = live
    outside = tmp_path / "outside"
    shutil.copytree(adapters_dir / "a1", outside)
    os.symlink(outside, root / "link")
    for path in ("../outside", str(outside), "link", "first/../../outside", "", "."):
        r = post(s, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
        assert r.status_code in (400, 404), (path, r.text)
        assert r.json()["error"]["param"] in ("lora_path", "lora_name")
    for name in ("../evil", "a/b", "", "tiny", ".hidden"):
        r = post(s, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "first"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name", name
    assert "evil" not in [m.id for m in s.client("secret").models.list().data]
    s.engine.registry.scan()  # a rescan sees the link and skips it
    assert "link" in s.engine.registry.skipped
    assert "link" not in [m.id for m in s.client("secret").models.list().data]
    with pytest.raises(LorakitError):
        inside(root, "link")


def test_bad_folder_fails_the_load_and_the_rest_serves(live):
    s, root = live
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text((root / "first" / "adapter_config.json").read_text())
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"garbage")
    r = post(s, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": "broken"})
    assert r.status_code == 400 and "safetensors" in r.json()["error"]["message"]
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_config.json").write_text((root / "first" / "adapter_config.json").read_text())
    (root / "pickled" / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    r = post(s, "/v1/load_lora_adapter", {"lora_name": "pickled", "lora_path": "pickled"})
    assert r.status_code == 400 and "never unpickles" in r.json()["error"]["message"]
    assert ask(s, "first") and ask(s, "tiny")
