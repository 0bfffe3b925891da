"""The `lorakit` command: each subcommand parses its flags and calls one library function.

    lorakit train CONFIG [--run NAME] [--set k=v ...] [--resume]
    lorakit eval --model M [--adapter DIR] --data FILE --metric exact_match|perplexity|kl [--json]
    lorakit generate --model M [--adapter DIR] [--prompt TEXT]
    lorakit merge --model M --adapter DIR --out DIR
    lorakit inspect ADAPTER_DIR [--png FILE] [--json]
    lorakit combine DIR_A DIR_B --weights 0.7 0.3 --method linear --rank 16 --out DIR
    lorakit demo [CONFIG]

Errors print one line (`lorakit: error: ...`) and exit 2; no traceback for bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import LorakitError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning: train, evaluate, merge, "
                                "inspect and combine adapters (PEFT-compatible files).")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train an adapter from a YAML run config")
    t.add_argument("config", help="YAML file: one run, or several under 'runs:'")
    t.add_argument("--run", help="name of the run to use when the file defines several")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.max_steps=100 (repeatable; wins over the file)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a model (and adapter) on a dataset")
    _model_args(e)
    e.add_argument("--data", required=True, help="JSONL/JSON/CSV/Parquet file")
    e.add_argument("--metric", required=True, choices=["exact_match", "perplexity", "kl"],
                   help="exact_match: greedy completion equals the answer; perplexity; kl: KL(adapter||base)")
    e.add_argument("--limit", type=int, help="use the first N records only")
    e.add_argument("--max-length", type=int, default=512, help="tokens per example (perplexity, kl)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")

    g = sub.add_parser("generate", help="generate text; with no --prompt, an interactive chat")
    _model_args(g)
    g.add_argument("--prompt", help="a user message; omit for an interactive chat (empty line or Ctrl-D ends)")
    g.add_argument("--max-new-tokens", type=int, default=256)

    m = sub.add_parser("merge", help="merge an adapter into the base: a plain transformers model folder")
    _model_args(m, adapter_required=True)
    m.add_argument("--out", required=True, help="output folder (config.json + model.safetensors + tokenizer)")

    i = sub.add_parser("inspect", help="per-layer update norms and effective ranks of an adapter")
    i.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    i.add_argument("--png", help="where to write the plot (default: ADAPTER/inspect.png)")
    i.add_argument("--json", action="store_true", help="print the report as JSON")

    c = sub.add_parser("combine", help="combine adapters by weights into a new adapter (task arithmetic)")
    c.add_argument("adapters", nargs="+", help="adapter folders")
    c.add_argument("--weights", nargs="+", type=float, required=True, help="one weight per adapter (negative negates)")
    c.add_argument("--method", default="linear",
                   help="cat (exact) | linear (dense sum, SVD to --rank) | svd | ties | dare_linear | dare_ties")
    c.add_argument("--rank", type=int, help="rank of the result (default: sum of ranks)")
    c.add_argument("--density", type=float, help="kept fraction for ties / dare")
    c.add_argument("--out", required=True, help="output adapter folder")

    d = sub.add_parser("demo", help="the main job: train the demo adapter on the default model, show before/after")
    d.add_argument("config", nargs="?", default="configs/demo.yaml")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def _model_args(p: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="local folder, Hub id, or the embedded default 'smollm2-135m-instruct'")
    p.add_argument("--adapter", required=adapter_required, help="adapter folder (lorakit's or PEFT's)")
    p.add_argument("--quantize", default="none", choices=["none", "nf4", "fp4", "int8"],
                   help="load the base quantized (QLoRA)")


def _load(args):
    from . import checkpoint
    from .models import load_model
    kwargs = {}
    if getattr(args, "quantize", "none") != "none":
        from .quant import quantization_config
        kwargs["quantization_config"] = quantization_config(args.quantize)
    model, tokenizer = load_model(args.model, **kwargs)
    if args.adapter:
        checkpoint.load_adapter(model, args.adapter)
    return model, tokenizer


def cmd_train(args) -> int:
    from .runs import load_run
    from .train import train
    cfg = load_run(args.config, args.run, args.overrides)
    result = train(cfg, resume=args.resume, progress=not args.quiet)
    print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps, "stopped": result.stopped,
                      "train_loss": round(result.train_loss, 4),
                      "eval_loss": None if result.eval_loss is None else round(result.eval_loss, 4)}))
    return 0


def cmd_eval(args) -> int:
    from . import data, evaluate, records
    rows = records.load_records(args.data)[: args.limit] if args.limit else records.load_records(args.data)
    model, tokenizer = _load(args)
    if args.metric == "exact_match":
        result = evaluate.exact_match(model, tokenizer, rows, batch_size=args.batch_size, progress=True)
        for s in result.pop("samples")[:5]:
            print(f"{'ok ' if s['ok'] else 'BAD'} expected {s['expected']!r} got {s['got']!r}")
    else:
        if args.metric == "kl" and not args.adapter:
            raise LorakitError("--metric kl compares an adapter with its base: give --adapter DIR")
        ds = data.prepare(rows, tokenizer, args.max_length)
        fn = evaluate.loss_and_perplexity if args.metric == "perplexity" else evaluate.kl_drift
        result = fn(model, ds, args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0


def cmd_generate(args) -> int:
    from .evaluate import generate
    model, tokenizer = _load(args)
    if args.prompt is not None:
        print(generate(model, tokenizer, [[{"role": "user", "content": args.prompt}]], args.max_new_tokens)[0])
        return 0
    history = []
    print("lorakit chat: type a message; an empty line or Ctrl-D ends.")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        history.append({"role": "user", "content": text})
        reply = generate(model, tokenizer, [history], args.max_new_tokens)[0].strip()
        history.append({"role": "assistant", "content": reply})
        print(f"model> {reply}")
    return 0


def cmd_merge(args) -> int:
    from . import adapters
    model, tokenizer = _load(args)
    if args.quantize != "none":
        from .quant import merge_to_full_precision
        model = merge_to_full_precision(model)
    else:
        model = adapters.merge_and_unload(model, safe_merge=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"merged model written to {args.out} (loads with transformers alone)")
    return 0


def cmd_inspect(args) -> int:
    from .inspect import format_report, inspect_adapter, plot_report
    report = inspect_adapter(args.adapter)
    png = plot_report(report, args.png or Path(args.adapter) / "inspect.png")
    if args.json:
        report["config"] = report["config"].to_dict()
        print(json.dumps(report))
    else:
        print(format_report(report))
        print(f"\nplot: {png}")
    return 0


def cmd_combine(args) -> int:
    from .combine_dirs import combine_adapter_dirs
    report = combine_adapter_dirs(args.adapters, args.weights, args.method, args.rank, args.out, density=args.density)
    print(report)
    print(f"combined adapter written to {args.out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo
    run_demo(args.config, args.overrides)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "merge": cmd_merge,
            "inspect": cmd_inspect, "combine": cmd_combine, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LorakitError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
