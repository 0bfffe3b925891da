"""lorakit export ADAPTER --format gguf|hf --out PATH [--merged] [--quant T] [--ollama]: for llama.cpp / Ollama.

    --format gguf              a llama.cpp LoRA adapter GGUF (use with the base model's GGUF)
    --format gguf --merged     the base with the adapter merged, one GGUF model file (--quant f32|f16|q8_0|q4_0)
    --format hf                the merged transformers folder (as `lorakit merge`)
    --ollama                   also write a Modelfile next to the GGUF
"""

from __future__ import annotations

from ..models.default import DEFAULT_MODEL
from ..models.quantize import QUANT_KINDS


def add(sub) -> None:
    p = sub.add_parser("export", help="export for llama.cpp / Ollama (GGUF adapter or merged GGUF) or as a "
                       "merged transformers folder")
    p.add_argument("adapter", metavar="ADAPTER", help="adapter folder (lorakit's or PEFT's)")
    p.add_argument("--format", required=True, choices=["gguf", "hf"])
    p.add_argument("--out", required=True, help="output .gguf file (--format gguf) or folder (--format hf)")
    p.add_argument("--merged", action="store_true", help="with --format gguf: one model file, adapter merged in")
    p.add_argument("--quant", default=None, choices=["f32", "f16", "q8_0", "q4_0"],
                   help="tensor type of the merged GGUF's weights (default f16)")
    p.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile next to the GGUF")
    p.add_argument("--model", default=None, help="the base model (default: the one the adapter names, else "
                   f"'{DEFAULT_MODEL}')")
    p.add_argument("--base-gguf", default=None, help="the base model's own GGUF (needed with --merged and "
                   f"--ollama unless the base is '{DEFAULT_MODEL}'; llama.cpp's convert_hf_to_gguf.py writes one)")
    p.add_argument("--quantize", default="none", choices=list(QUANT_KINDS),
                   help="load the base quantized, as a QLoRA adapter was trained (merged exactly in fp32)")


def run(args) -> int:
    from pathlib import Path

    from ..atomic import refuse_output_onto_inputs
    from ..errors import LorakitError
    from ..export import base_gguf_for
    problems = _flag_problems(args)
    LorakitError.collect(problems, "lorakit export:")
    model_name = args.model or _recorded_base(args.adapter)
    base_gguf = base_gguf_for(model_name, args.base_gguf) if args.format == "gguf" else None
    if args.format == "gguf" and (args.merged or args.ollama) and base_gguf is None:
        raise LorakitError(f"{'--merged' if args.merged else '--ollama'} needs the base model's GGUF: pass "
                           "--base-gguf FILE (llama.cpp's convert_hf_to_gguf.py writes it from the base folder), "
                           "or use --format hf")
    inputs = [args.adapter] + [p for p in (base_gguf, model_name) if p and Path(p).exists()]
    refuse_output_onto_inputs(args.out, inputs, "the export")
    model, tokenizer = _load(args, model_name)
    if args.format == "hf":
        from ..export import export_hf
        export_hf(model, tokenizer, args.out, quantized=args.quantize != "none")
        print(f"merged model written to {args.out} (loads with transformers alone)")
        return 0
    if args.merged:
        from ..export import export_merged_gguf
        out = export_merged_gguf(model, base_gguf, args.out, args.quant or "f16")
        print(f"merged GGUF written to {out}: llama-cli -m {out}")
        model_file, adapter_file = out, None
    else:
        from ..export import export_adapter_gguf
        out = export_adapter_gguf(model, args.out, base_gguf=base_gguf)
        base_hint = base_gguf or "BASE.gguf"
        print(f"llama.cpp adapter written to {out}: llama-cli -m {base_hint} --lora {out}")
        model_file, adapter_file = base_gguf, out
    if args.ollama:
        from ..export import write_modelfile
        path = write_modelfile(out, model_file, adapter_file, _chat_template(base_gguf, tokenizer))
        print(f"Ollama Modelfile written to {path}: ollama create NAME -f {path}")
    return 0


def _flag_problems(args) -> list[str]:
    problems = []
    if args.format == "hf":
        problems += [f"{flag} applies to --format gguf only" for flag, on in
                     (("--quant", args.quant), ("--ollama", args.ollama), ("--base-gguf", args.base_gguf)) if on]
    elif not args.merged and args.quant:
        problems.append("--quant applies to --merged (an adapter GGUF is written in f32, exactly)")
    if args.format == "gguf" and not args.merged and args.quantize != "none":
        problems.append("--quantize applies to merged exports; the adapter file itself needs no base")
    return problems


def _recorded_base(adapter: str) -> str:
    """The base the adapter's config names, if it is the default or an existing folder; else the default."""
    from pathlib import Path

    from ..adapters.files import read_adapter
    from ..errors import LorakitError
    from ..models.default import is_default
    config, _ = read_adapter(adapter)
    named = config.base_model_name_or_path
    if not named or is_default(named):
        return DEFAULT_MODEL
    if Path(named).is_dir() or not Path(named).is_absolute():
        return named
    raise LorakitError(f"the adapter names its base {named!r}, which is not there any more: pass --model")


def _load(args, model_name: str):
    from argparse import Namespace

    from .common import load
    return load(Namespace(model=model_name, adapter=args.adapter, quantize=args.quantize))


def _chat_template(base_gguf, tokenizer) -> str | None:
    if base_gguf is not None:
        from ..export.basefile import reader
        field = reader(base_gguf).fields.get("tokenizer.chat_template")
        if field is not None:
            return field.contents()
    return getattr(tokenizer, "chat_template", None)
