"""The `lorakit` command: one verb a file, each parsing its flags and calling one library function.

    lorakit train CONFIG [--run NAME] [--set k=v ...] [--resume]
    lorakit eval --model M [--adapter DIR] --data FILE --metric exact_match|perplexity|kl [--json]
    lorakit generate --model M [--adapter DIR] [--prompt TEXT]
    lorakit merge --model M --adapter DIR --out DIR
    lorakit inspect ADAPTER_DIR [--compare OTHER_DIR] [--png FILE] [--json]
    lorakit export ADAPTER --format gguf|hf --out PATH [--merged] [--quant q8_0] [--ollama]
    lorakit combine DIR_A DIR_B --weights 0.7 0.3 --method linear --rank 16 --out DIR
    lorakit demo [CONFIG]
    lorakit serve --model M --adapters DIR [--port 8000] [--api-key KEY] [--admin-key KEY] [--runs DIR]
    lorakit intrinsic-dim CONFIG --dims 10,100,1000 [--over adapter|model] [--said] [--json]
    lorakit sweep CONFIG --set lora.r=1,2,4 [--set KEY=V1,V2 ...] [--json]
    lorakit ui [--runs DIR] [--adapters DIR] [--model M] [--port 7860] [--api-key KEY]

Errors print one line (`lorakit: error: ...`) and exit 2; no traceback for bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import LorakitError
from . import combine, demo, evaluate, export, generate, inspection, intrinsic_dim, merge, serve, sweep, train, ui

VERBS = {"train": train, "eval": evaluate, "generate": generate, "merge": merge, "inspect": inspection,
         "combine": combine, "export": export, "demo": demo, "serve": serve, "intrinsic-dim": intrinsic_dim,
         "sweep": sweep, "ui": ui}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning: train, evaluate, merge, "
                                "inspect and combine adapters (PEFT-compatible files).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS.values():
        verb.add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return VERBS[args.command].run(args)
    except LorakitError as e:
        print(f"lorakit: error{_rank()}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130


def _rank() -> str:
    """" (rank 1 of 2)" in a process torchrun started, so that each error says whose it is."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
