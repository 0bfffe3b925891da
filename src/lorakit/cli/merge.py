"""lorakit merge --model M --adapter DIR --out DIR: a plain transformers model folder with the adapter in."""

from __future__ import annotations

from .common import load, model_args


def add(sub) -> None:
    m = sub.add_parser("merge", help="merge an adapter into the base: a plain transformers model folder")
    model_args(m, adapter_required=True)
    m.add_argument("--out", required=True, help="output folder (config.json + model.safetensors + tokenizer)")


def run(args) -> int:
    from pathlib import Path

    from ..atomic import refuse_output_onto_inputs
    from ..errors import LorakitError
    from ..models.load import resolve_model
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} is a file; the merged model is a folder (config.json, model.safetensors, "
                           "tokenizer): give a folder path")
    inputs = [args.adapter] + [p for p in [resolve_model(args.model)] if Path(p).is_dir()]
    refuse_output_onto_inputs(out, inputs, "the merged model")
    model, tokenizer = load(args)
    from ..export import export_hf
    export_hf(model, tokenizer, out, quantized=args.quantize != "none")
    print(f"merged model written to {out} (loads with transformers alone)")
    return 0
