"""How a Llama-family transformers model's tensors are named and laid out in a GGUF file.

GGUF names follow llama.cpp's converter (gguf's tensor name map): model.layers.N.self_attn.q_proj ->
blk.N.attn_q, mlp.down_proj -> blk.N.ffn_down, embed_tokens -> token_embd, lm_head -> output. For the
`llama` architecture (Llama, SmolLM2, Mistral) llama.cpp's converter permutes the rows of q_proj and
k_proj within each head from transformers' rotate-half order (first half, second half) to interleaved
pairs: GGUF row h*hd + 2j + k <- HF row h*hd + k*hd/2 + j. Qwen2 keeps transformers' order.
numpy shapes here are HF's (out, in); GGUF stores the reverse (ne[0] = in).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LorakitError

# transformers model_type -> (llama.cpp architecture, q/k rows permuted)
SUPPORTED = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}


def supported_names() -> str:
    return "Llama-family models: " + ", ".join(sorted(SUPPORTED)) + " (SmolLM2 is a llama)"


@dataclass(frozen=True)
class Layout:
    """The GGUF layout of one model: llama.cpp's architecture name, head counts, the name map."""

    arch: str
    n_layers: int
    n_head: int
    n_head_kv: int
    permute_qk: bool
    tied: bool  # lm_head shares the input embedding (GGUF then has no output.weight)

    def gguf_name(self, hf_name: str) -> str | None:
        """'model.layers.0.self_attn.q_proj' -> 'blk.0.attn_q'; with '.weight'/'.bias' kept; None if unknown."""
        import gguf
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch)
        table = gguf.get_tensor_name_map(arch, self.n_layers)
        return table.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def heads_for(self, hf_name: str) -> int | None:
        """The head count whose rows llama.cpp permutes for this HF tensor/module, or None (no permutation)."""
        if not self.permute_qk:
            return None
        leaf = hf_name.removesuffix(".weight").removesuffix(".bias").rsplit(".", 1)[-1]
        return {"q_proj": self.n_head, "k_proj": self.n_head_kv}.get(leaf)

    def to_gguf_rows(self, hf_name: str, rows: np.ndarray) -> np.ndarray:
        """Rows (axis 0) of a weight, bias or LoRA B of `hf_name` in GGUF's order."""
        heads = self.heads_for(hf_name)
        return rows if heads is None else permute_rows(rows, heads)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: per head, rotate-half rows -> interleaved pairs (axis 0 only)."""
    if w.shape[0] % (2 * n_head):
        raise LorakitError(f"cannot permute {w.shape[0]} rows into {n_head} heads of even size")
    return np.ascontiguousarray(
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def layout_of(config) -> Layout:
    """The Layout of a transformers config, or a LorakitError naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise LorakitError(f"GGUF export supports {supported_names()}; this model is {model_type!r}. "
                           "Use `lorakit export ADAPTER --format hf` for a merged transformers folder instead")
    arch, permute = SUPPORTED[model_type]
    n_head = config.num_attention_heads
    return Layout(arch=arch, n_layers=config.num_hidden_layers, n_head=n_head,
                  n_head_kv=getattr(config, "num_key_value_heads", None) or n_head, permute_qk=permute,
                  tied=bool(getattr(config, "tie_word_embeddings", False)))
