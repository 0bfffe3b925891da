"""Exports for other runtimes: a llama.cpp LoRA adapter GGUF, the merged model as GGUF or as a transformers
folder, and an Ollama Modelfile (adapter.py, merged.py, hf.py, modelfile.py; layout.py: GGUF names and
row order; basefile.py: the base's own GGUF)."""

from .adapter import export_adapter_gguf, llama_cpp_scale, lora_pairs, write_lora_gguf
from .basefile import base_gguf_for
from .hf import export_hf
from .layout import SUPPORTED, layout_of
from .merged import QUANTS, export_merged_gguf, write_merged_gguf
from .modelfile import write_modelfile

__all__ = ["export_adapter_gguf", "llama_cpp_scale", "lora_pairs", "write_lora_gguf", "base_gguf_for", "export_hf",
           "SUPPORTED", "layout_of", "QUANTS", "export_merged_gguf", "write_merged_gguf", "write_modelfile"]
