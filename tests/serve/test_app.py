"""The HTTP API through the official openai client, on loopback: models, completions, chat, streaming, errors."""

import httpx
import openai
import pytest
import torch

from lorakit.eval.generation import generate
from lorakit.models.load import load_model
from serving import adapters_dir, server, start_server  # noqa: F401  (fixtures)


def reference(model_dir, adapters_dir, adapter, prompt, n):
    """What `lorakit generate` prints for this adapter and prompt (a chat message, greedy)."""
    import lorakit
    model, tok = load_model(str(model_dir))
    if adapter is not None:
        lorakit.load_adapter(model, adapters_dir / adapter)
    return generate(model, tok, [[{"role": "user", "content": prompt}]] if isinstance(prompt, str) and
                    not prompt.startswith("RAW:") else [prompt[4:]], n)[0]


def test_models_list(server):
    models = server.client("secret").models.list().data
    assert models[0].id == "tiny" and models[0].parent is None
    assert [m.id for m in models[1:]] == [f"a{i}" for i in range(8)]
    assert all(m.parent == "tiny" for m in models[1:])


def test_chat_greedy_equals_lorakit_generate(server, tiny_model_dir, adapters_dir):
    c = server.client("secret")
    for model, adapter in (("tiny", None), ("a3", "a3")):
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": "Name a colour"}],
                                      max_tokens=12, temperature=0)
        assert r.choices[0].message.content == reference(tiny_model_dir, adapters_dir, adapter, "Name a colour", 12)
        assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
        assert r.choices[0].finish_reason == "length"


def test_completion_and_streaming(server, tiny_model_dir, adapters_dir):
    c = server.client("secret")
    whole = c.completions.create(model="a1", prompt="Once upon a time", max_tokens=10, temperature=0)
    assert whole.choices[0].text == reference(tiny_model_dir, adapters_dir, "a1", "RAW:Once upon a time", 10)
    chunks = list(c.completions.create(model="a1", prompt="Once upon a time", max_tokens=10, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 10
    chat = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=8, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason == "length"
    text = "".join(ch.choices[0].delta.content or "" for ch in chat)
    assert text == c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=8, temperature=0).choices[0].message.content
    raw = httpx.post(server.url + "/v1/completions", headers={"Authorization": "Bearer secret"},
                     json={"model": "tiny", "prompt": "x", "max_tokens": 2, "stream": True}).text
    assert raw.rstrip().endswith("data: [DONE]")


def test_stop_and_seed(server):
    c = server.client("secret")
    base = c.completions.create(model="a2", prompt="abc", max_tokens=12, temperature=0).choices[0].text
    stop = base[3:6]
    cut = c.completions.create(model="a2", prompt="abc", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[:base.index(stop)] and cut.choices[0].finish_reason == "stop"
    one = [c.completions.create(model="a2", prompt="abc", max_tokens=8, temperature=1.0, seed=7).choices[0].text
           for _ in range(2)]
    assert one[0] == one[1]


def test_errors_through_the_client(server):
    c = server.client("secret")
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "a0" in e.value.body["message"] and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=500)
    assert "128" in e.value.body["message"] and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="word " * 300, max_tokens=2)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", temperature=5)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").models.list()
    assert httpx.get(server.url + "/health").status_code == 401
    assert httpx.get(server.url + "/health", headers={"Authorization": "Bearer secret"}).json()["status"] == "ok"
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": "Bearer secret"}, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": "Bearer secret",
                   "Content-Length": str(10 << 20)}, content=b"x" * (10 << 20))
    assert r.status_code == 413


def test_queue_full_is_429(tiny_model_dir, adapters_dir):
    import threading
    import time
    s = start_server(tiny_model_dir, adapters_dir, max_queue=1, start=False)  # the engine not yet stepping
    try:
        first = threading.Thread(target=lambda: s.client().completions.create(model="tiny", prompt="x", max_tokens=2))
        first.start()
        deadline = time.time() + 20
        while s.engine.inbox.qsize() < 1 and time.time() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as e:
            s.client().completions.create(model="tiny", prompt="y", max_tokens=2)
        assert e.value.response.headers["retry-after"] == "1"
        s.engine.start()
        first.join(30)
        assert not first.is_alive()
    finally:
        s.engine.start() if s.engine._thread is None else None
        s.stop()


def test_metrics(server):
    c = server.client("secret")
    c.completions.create(model="a0", prompt="x", max_tokens=3, temperature=0)
    text = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer secret"}).text
    for name in ("lorakit_requests_total", "lorakit_generation_tokens_total", "lorakit_queue_depth",
                 "lorakit_running_sequences", "lorakit_waiting_sequences", "lorakit_resident_adapters",
                 "lorakit_request_latency_seconds_bucket", "lorakit_time_to_first_token_seconds_bucket"):
        assert name in text, name
    assert 'lorakit_generation_tokens_total{model="a0"}' in text
