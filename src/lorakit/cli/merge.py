"""lorakit merge --model M --adapter DIR --out DIR: a plain transformers model folder with the adapter in."""

from __future__ import annotations

from .common import load, model_args


def add(sub) -> None:
    m = sub.add_parser("merge", help="merge an adapter into the base: a plain transformers model folder")
    model_args(m, adapter_required=True)
    m.add_argument("--out", required=True, help="output folder (config.json + model.safetensors + tokenizer)")


def run(args) -> int:
    from ..adapters import manage
    model, tokenizer = load(args)
    if args.quantize != "none":
        from ..adapters.quantize import merge_to_full_precision
        model = merge_to_full_precision(model)
    else:
        model = manage.merge_and_unload(model, safe_merge=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"merged model written to {args.out} (loads with transformers alone)")
    return 0
