"""What several verbs share: the --model / --adapter / --quantize flags and loading what they name."""

from __future__ import annotations

import argparse

from ..models.default import DEFAULT_MODEL
from ..models.quantize import QUANT_KINDS


def model_args(p: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"local folder, Hub id, or the embedded default '{DEFAULT_MODEL}'")
    p.add_argument("--adapter", required=adapter_required, help="adapter folder (lorakit's or PEFT's)")
    p.add_argument("--quantize", default="none", choices=list(QUANT_KINDS), help="load the base quantized (QLoRA)")


def load(args):
    """(model, tokenizer) as --model / --quantize / --adapter say."""
    from ..adapters import files
    from ..models.load import load_model
    kwargs = {}
    if getattr(args, "quantize", "none") != "none":
        from ..models.quantize import quantization_config
        kwargs["quantization_config"] = quantization_config(args.quantize)
    model, tokenizer = load_model(args.model, **kwargs)
    if args.adapter:
        files.load_adapter(model, args.adapter)
    return model, tokenizer


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (--limit 0 or -7 is an error, not 'everything' or 'one')."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
