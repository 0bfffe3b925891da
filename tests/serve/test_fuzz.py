"""Schema fuzzing against the running server's OpenAPI document: no request a client can send gets a 500.

Hypothesis draws bodies from the documented schemas (and arbitrary JSON for every field, NaN and
±Infinity included, which Python's json module writes as bare literals), bounded to
a few dozen examples per endpoint so the test stays quick.
"""

import json

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from serving import adapters_dir, server  # noqa: F401  (fixtures)

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) |
                    st.text(max_size=20), lambda kids: st.lists(kids, max_size=3) |
                    st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "n",
          "stream_options", "lora_name", "lora_path", "max_completion_tokens"]


def good_values():
    return st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["tiny", "a0", "a5", "nope", ""]),
        "prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), max_size=2),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                                    "content": st.text(max_size=20)}), max_size=3),
        "max_tokens": st.integers(-3, 300), "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5),
        "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=6),
        "seed": st.integers(-2**64, 2**64), "stream": st.booleans(), "n": st.integers(-1, 3),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "lora_name": st.text(max_size=12), "lora_path": st.text(max_size=12)})


def bodies():
    mixed = st.dictionaries(st.sampled_from(FIELDS), JSON, max_size=6)
    return good_values() | mixed | JSON


def test_openapi_document_lists_the_endpoints(server):
    spec = httpx.get(server.url + "/openapi.json", headers={"Authorization": "Bearer secret"}).json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter"} <= set(spec["paths"])


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                             "/v1/unload_lora_adapter", "/v1/models", "/v1/nothing"]),
       body=bodies(), key=st.sampled_from(["secret", "root", "bad"]))
@example(path="/v1/completions", body={"model": "tiny", "prompt": "x", "temperature": float("nan")}, key="secret")
@example(path="/v1/chat/completions", body={"model": "a0", "messages": [{"role": "user", "content": "x"}],
                                            "top_p": float("inf"), "max_tokens": 2}, key="secret")
def test_no_500s(server, path, body, key):
    if isinstance(body, dict) and body.get("max_tokens", 0) and isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = min(body["max_tokens"], 8)  # keep generation short
    # json.dumps as Python clients send it: NaN and Infinity go out as bare literals (httpx's json= refuses them)
    r = httpx.post(server.url + path, content=json.dumps(body), timeout=60,
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code < 500, (path, body, r.status_code, r.text)
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["code"] == r.status_code and err["message"]


def test_non_finite_numbers_are_a_400_naming_the_field(server):
    for field in ("temperature", "top_p"):
        for literal in ("NaN", "Infinity", "-Infinity"):
            body = '{"model": "tiny", "prompt": "hi", "max_tokens": 2, "%s": %s}' % (field, literal)
            r = httpx.post(server.url + "/v1/completions", content=body, timeout=60,
                           headers={"Authorization": "Bearer secret", "Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, (field, literal, r.status_code, r.text)
            assert r.json()["error"]["code"] == r.status_code
