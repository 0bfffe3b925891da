"""An Ollama Modelfile next to an exported GGUF: FROM the model file, ADAPTER when there is an adapter file,
the chat template as a Go TEMPLATE, its stop token, and the template's default system prompt.

Ollama's TEMPLATE is Go text/template, not Jinja, so only known template families are translated
(ChatML: SmolLM2, Qwen2; Llama 3 headers); for any other, no TEMPLATE is written and Ollama takes the
template from the GGUF's tokenizer.chat_template itself (a comment in the file says so).
Paths are written relative to the Modelfile when they sit beside or below it, else absolute.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..atomic import atomic_write_text

CHATML = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
          '{{ .Response }}<|im_end|>\n')
LLAMA3 = ('{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
          '{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}'
          '<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>')


def go_template(chat_template: str | None) -> tuple[str | None, str | None, str | None]:
    """(Go TEMPLATE, stop token, default system prompt) for a Jinja chat template of a known family."""
    if not chat_template:
        return None, None, None
    if "<|im_start|>" in chat_template:
        system = re.search(r"<\|im_start\|>system(?:\n|\\n)([^<{}'\"\\]+)<\|im_end\|>", chat_template)
        return CHATML, "<|im_end|>", system.group(1) if system else None
    if "<|start_header_id|>" in chat_template:
        return LLAMA3, "<|eot_id|>", None
    return None, None, None


def _where(path: Path, folder: Path) -> str:
    path = Path(path).expanduser().resolve()
    try:
        return "./" + str(path.relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def modelfile_text(folder: Path, model: Path, adapter: Path | None, chat_template: str | None) -> str:
    template, stop, system = go_template(chat_template)
    lines = ["# Ollama Modelfile written by `lorakit export`; use: ollama create NAME -f Modelfile && ollama run NAME",
             f"FROM {_where(model, folder)}"]
    if adapter is not None:
        lines.append(f"ADAPTER {_where(adapter, folder)}")
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: Ollama reads the chat template from the GGUF's tokenizer.chat_template")
    if system:
        lines.append(f'SYSTEM """{system}"""')
    if stop:
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"


def write_modelfile(next_to: str | Path, model: str | Path, adapter: str | Path | None = None,
                    chat_template: str | None = None) -> Path:
    """Write `Modelfile` in the folder of `next_to` (the exported GGUF), atomically."""
    folder = Path(next_to).expanduser().resolve().parent
    path = folder / "Modelfile"
    atomic_write_text(path, modelfile_text(folder, Path(model), Path(adapter) if adapter else None, chat_template))
    os.chmod(path, 0o644)
    return path
