"""Running exported files in llama.cpp (llama-cpp-python) and lorakit side by side: shared by the llama.cpp
tests and benchmarks/bench_export_llamacpp.py. Token ids go in directly (no second tokenizer), one thread
(on a busy 2-core machine two OpenMP threads can be 50x slower), the KV cache reset between settings."""

from __future__ import annotations

import ctypes

import numpy as np
import torch

PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, there was a",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):",
    "The best way to learn a language is",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "In 1492, Columbus",
    "<|im_start|>user\nTranslate 'thank you' into French.<|im_end|>\n<|im_start|>assistant\n",
    "The three primary colours are",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which",
    "<|im_start|>user\nWhat is the capital of Japan?<|im_end|>\n<|im_start|>assistant\n",
    "A healthy breakfast includes",
    "<|im_start|>user\nGive me a synonym for happy.<|im_end|>\n<|im_start|>assistant\n",
    "The largest planet in the solar system is",
    "<|im_start|>user\nHow many legs does a spider have?<|im_end|>\n<|im_start|>assistant\n",
    "To make a cup of tea, first",
    "<|im_start|>user\nWhat does a thermometer measure?<|im_end|>\n<|im_start|>assistant\n",
    "My favourite season is",
]


def llama(path, f32_kv: bool = False):
    import llama_cpp
    kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_kv else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1,
                           n_threads_batch=1, seed=0, **kv)


def set_adapter(llm, path) -> object:
    """Load a LoRA GGUF onto a loaded model through the low-level API (a failed load is a NULL pointer,
    which the Llama constructor does not notice: it would segfault at the first eval)."""
    import llama_cpp
    ad = llama_cpp.llama_adapter_lora_init(llm._model.model, str(path).encode())
    if not ad:
        raise RuntimeError(f"llama.cpp refused the adapter {path}")
    arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(ad)
    assert llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, arr, 1, (ctypes.c_float * 1)(1.0)) == 0
    llm.reset()
    return ad


def clear_adapter(llm, ad) -> None:
    import llama_cpp
    llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, None, 0, None)
    llama_cpp.llama_adapter_lora_free(ad)
    llm.reset()


def llama_run(llm, ids: list[int], n_new: int) -> tuple[np.ndarray, list[int]]:
    """(logits predicting the first new token, n_new greedy tokens)."""
    llm.reset()
    llm.eval(ids)
    first = llm.scores[len(ids) - 1].copy()
    out = []
    for _ in range(n_new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return first, out


@torch.no_grad()
def lorakit_run(model, ids: list[int], n_new: int) -> tuple[np.ndarray, list[int]]:
    x = torch.tensor([ids])
    first, out = None, []
    for _ in range(n_new):
        logits = model(input_ids=x).logits[0, -1].float()
        first = logits.numpy().copy() if first is None else first
        tok = int(torch.argmax(logits))
        out.append(tok)
        x = torch.cat([x, torch.tensor([[tok]])], dim=1)
    return first, out


def agreement(lk: list[tuple], lc: list[tuple]) -> tuple[int, list[float]]:
    """(prompts whose greedy continuation is identical, max |first-token logit difference| per prompt)."""
    same = sum(a[1] == b[1] for a, b in zip(lk, lc))
    return same, [float(np.max(np.abs(a[0] - b[0]))) for a, b in zip(lk, lc)]
