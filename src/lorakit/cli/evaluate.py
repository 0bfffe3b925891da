"""lorakit eval --model M [--adapter DIR] [--data FILE --metric exact_match|perplexity|kl] [--forgetting] [--json]."""

from __future__ import annotations

import json

from ..errors import LorakitError
from .common import load, model_args, positive_int


def add(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model (and adapter) on a dataset")
    model_args(e)
    e.add_argument("--data", help="JSONL/JSON/CSV/Parquet file (the task metric)")
    e.add_argument("--metric", choices=["exact_match", "perplexity", "kl"],
                   help="exact_match: greedy completion equals the answer; perplexity; kl: KL(adapter||base)")
    e.add_argument("--limit", type=positive_int, help="use the first N records only (N >= 1), of --data and of the general text")
    e.add_argument("--max-length", type=int, default=512, help="tokens per example (perplexity, kl)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--forgetting", action="store_true",
                   help="also measure forgetting: base vs adapter perplexity and KL on general text shipped with lorakit")
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def run(args) -> int:
    _check(args)
    model, tokenizer = None, None
    result = {}
    if args.data:
        model, tokenizer = _task_metric(args, result)
    if args.forgetting:
        from ..eval.forgetting import describe, forgetting, general_text
        if model is None:
            model, tokenizer = load(args)
        passages = general_text()[: args.limit] if args.limit else None
        drift = forgetting(model, tokenizer, passages, max_length=args.max_length, batch_size=args.batch_size)
        print(describe(drift))
        result["forgetting"] = drift
    if args.json:
        print(json.dumps(result))
    return 0


def _check(args) -> None:
    if args.data and not args.metric:
        raise LorakitError(f"--data {args.data}: pick the metric with --metric exact_match|perplexity|kl")
    if args.metric and not args.data:
        raise LorakitError(f"--metric {args.metric} needs --data FILE: the records to measure it on")
    if not args.data and not args.forgetting:
        raise LorakitError("nothing to evaluate: give --data FILE --metric M (the task metric), --forgetting, or both")
    if (args.forgetting or args.metric == "kl") and not args.adapter:
        what = "--forgetting" if args.forgetting else "--metric kl"
        raise LorakitError(f"{what} compares an adapter with its base: give --adapter DIR")


def _task_metric(args, result: dict):
    """The task metric on --data, printed as one line and stored in result; returns (model, tokenizer)."""
    from .. import eval as evaluation
    from ..data import load_records, prepare
    rows = load_records(args.data)
    if args.metric == "exact_match" and rows.format == "text":
        raise LorakitError(f"{args.data} holds 'text' records, which have no prompt and answer: exact_match needs "
                           "messages, prompt/completion or instruction/output records; use --metric perplexity")
    rows = rows[: args.limit] if args.limit else rows
    model, tokenizer = load(args)
    if args.metric == "exact_match":
        metric = evaluation.exact_match(model, tokenizer, rows, batch_size=args.batch_size, progress=True)
        for s in metric.pop("samples")[:5]:
            print(f"{'ok ' if s['ok'] else 'BAD'} expected {s['expected']!r} got {s['got']!r}")
    else:
        ds = prepare(rows, tokenizer, args.max_length)
        fn = evaluation.loss_and_perplexity if args.metric == "perplexity" else evaluation.kl_drift
        metric = fn(model, ds, args.batch_size)
    print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metric.items()))
    result.update(metric)
    return model, tokenizer
