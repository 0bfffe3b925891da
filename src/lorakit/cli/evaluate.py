"""lorakit eval --model M [--adapter DIR] --data FILE --metric exact_match|perplexity|kl [--json]."""

from __future__ import annotations

import json

from ..errors import LorakitError
from .common import load, model_args, positive_int


def add(sub) -> None:
    e = sub.add_parser("eval", help="evaluate a model (and adapter) on a dataset")
    model_args(e)
    e.add_argument("--data", required=True, help="JSONL/JSON/CSV/Parquet file")
    e.add_argument("--metric", required=True, choices=["exact_match", "perplexity", "kl"],
                   help="exact_match: greedy completion equals the answer; perplexity; kl: KL(adapter||base)")
    e.add_argument("--limit", type=positive_int, help="use the first N records only (N >= 1)")
    e.add_argument("--max-length", type=int, default=512, help="tokens per example (perplexity, kl)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def run(args) -> int:
    from .. import eval as evaluation
    from ..data import load_records, prepare
    rows = load_records(args.data)
    if args.metric == "exact_match" and rows.format == "text":
        raise LorakitError(f"{args.data} holds 'text' records, which have no prompt and answer: exact_match needs "
                           "messages, prompt/completion or instruction/output records; use --metric perplexity")
    rows = rows[: args.limit] if args.limit else rows
    model, tokenizer = load(args)
    if args.metric == "exact_match":
        result = evaluation.exact_match(model, tokenizer, rows, batch_size=args.batch_size, progress=True)
        for s in result.pop("samples")[:5]:
            print(f"{'ok ' if s['ok'] else 'BAD'} expected {s['expected']!r} got {s['got']!r}")
    else:
        if args.metric == "kl" and not args.adapter:
            raise LorakitError("--metric kl compares an adapter with its base: give --adapter DIR")
        ds = prepare(rows, tokenizer, args.max_length)
        fn = evaluation.loss_and_perplexity if args.metric == "perplexity" else evaluation.kl_drift
        result = fn(model, ds, args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return 0
