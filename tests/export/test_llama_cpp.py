"""Checked by llama.cpp itself: the exported adapter and merged GGUFs, on the default model (SmolLM2-135M,
its shipped Q4_1 GGUF as base). Needs the `llamacpp` extra (llama-cpp-python); skipped without it.

Exact checks use an all-F32 copy of the base GGUF and an F32 KV cache (then llama.cpp and transformers agree
to ~4e-5 logits); checks on the shipped Q4_1 file compare greedy text (ggml quantizes activations for
quantized weights, ~0.3-1.4 logits of noise). An adapter converted the naive way (alpha/r for rsLoRA)
must fail the exact check: that is what shows the check can fail.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")
pytestmark = [pytest.mark.llamacpp, pytest.mark.slow]

import lorakit  # noqa: E402
from lorakit.adapters import manage  # noqa: E402
from lorakit.export import export_adapter_gguf, export_merged_gguf, lora_pairs, write_lora_gguf, write_merged_gguf  # noqa: E402,E501
from lorakit.models.default import default_gguf_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # llama_check: shared with benchmarks/bench_export_llamacpp.py
from llama_check import PROMPTS, agreement, clear_adapter, llama, llama_run, lorakit_run, set_adapter  # noqa: E402

N_PROMPTS, N_NEW = 3, 5  # few and short: the 20-prompt figures come from benchmarks/bench_export_llamacpp.py
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def adapted(model, seed=0, std=0.02, **kw):
    """A rsLoRA adapter with a rank pattern, B drawn as after training (B=0 would test nothing). A's Kaiming
    init draws from the global RNG: seeded here, so the adapter does not depend on which tests ran before."""
    torch.manual_seed(seed)
    lorakit.add_adapter(model, lorakit.LoraConfig(target_modules=TARGETS, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in manage.lora_layers(model):
            layer.lora_B["default"].normal_(0, std, generator=g)
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    try:
        base_file = default_gguf_file()
        model, tok = lorakit.load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    except lorakit.LorakitError as e:
        pytest.skip(str(e))
    tmp = tmp_path_factory.mktemp("llamacpp")
    base32 = write_merged_gguf(model, base_file, tmp / "base-f32.gguf", "f32")  # the base itself, all F32
    adapted(model, r=8, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 4, "down_proj": 12})
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:N_PROMPTS]]
    want = [lorakit_run(model, i, N_NEW) for i in ids]
    adapter = export_adapter_gguf(model, tmp / "adapter.gguf", base_gguf=base_file)
    naive = write_lora_gguf(tmp / "naive.gguf", "llama", [(p.name, p.A, p.B) for p in lora_pairs(model)], 16.0)
    merged32 = export_merged_gguf(model, base_file, tmp / "merged-f32.gguf", "f32")  # merges `model` in place
    return dict(base=base_file, base32=base32, adapter=adapter, naive=naive, merged32=merged32, ids=ids,
                want=want, model=model, tmp=tmp)


def run_all(llm, ids):
    return [llama_run(llm, i, N_NEW) for i in ids]


def test_adapter_on_f32_base_matches_lorakit_and_naive_does_not(setup):
    llm = llama(setup["base32"], f32_kv=True)
    ad = set_adapter(llm, setup["adapter"])
    same, diffs = agreement(setup["want"], run_all(llm, setup["ids"]))
    clear_adapter(llm, ad)
    ad = set_adapter(llm, setup["naive"])
    _, naive_diffs = agreement(setup["want"], run_all(llm, setup["ids"]))
    clear_adapter(llm, ad)
    print(f"exported: {same}/{N_PROMPTS} same, max |dlogit| {max(diffs):.2e}; naive {min(naive_diffs):.2f}")
    assert max(diffs) < 2e-3 and same == N_PROMPTS
    assert min(naive_diffs) > 0.1


def test_adapter_on_shipped_q4_1_base_gives_lorakit_greedy_text(setup):
    llm = llama(setup["base"])
    ad = set_adapter(llm, setup["adapter"])
    same, diffs = agreement(setup["want"], run_all(llm, setup["ids"]))
    clear_adapter(llm, ad)
    print(f"Q4_1 base + adapter: {same}/{N_PROMPTS} same greedy text, max |dlogit| {max(diffs):.2f}")
    assert same >= N_PROMPTS - 1


def test_merged_f32_matches_lorakit_and_keeps_the_header(setup):
    import gguf
    same, diffs = agreement(setup["want"], run_all(llama(setup["merged32"], f32_kv=True), setup["ids"]))
    assert max(diffs) < 2e-3 and same == N_PROMPTS
    fields = [gguf.GGUFReader(str(p)).fields for p in (setup["merged32"], setup["base"])]
    for key in ("tokenizer.chat_template", "tokenizer.ggml.tokens", "llama.rope.freq_base", "general.name"):
        assert fields[0][key].contents() == fields[1][key].contents()
    assert fields[0]["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)


@pytest.mark.slow
def test_merged_q8_0_gives_lorakit_greedy_text(setup):
    path = write_merged_gguf(setup["model"], setup["base"], setup["tmp"] / "merged-q8_0.gguf", "q8_0")
    same, diffs = agreement(setup["want"], run_all(llama(path), setup["ids"]))
    print(f"merged q8_0: {same}/{N_PROMPTS} same greedy text, max |dlogit| {max(diffs):.2f}")
    assert same >= N_PROMPTS - 1


@pytest.mark.slow
def test_a_dora_adapter_merges(tmp_path):
    """DoRA cannot be a llama.cpp adapter, but its merged GGUF runs in llama.cpp as lorakit's model."""
    model, tok = lorakit.load_model("smollm2-135m-instruct", dtype=torch.float32, device="cpu")
    adapted(model, seed=3, std=0.05, r=4, lora_alpha=8, use_dora=True)
    ids = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    want = lorakit_run(model, ids, 3)
    path = export_merged_gguf(model, default_gguf_file(), tmp_path / "dora.gguf", "f32")
    got = llama_run(llama(path, f32_kv=True), ids, 3)
    assert got[1] == want[1] and float(np.max(np.abs(got[0] - want[0]))) < 2e-3
