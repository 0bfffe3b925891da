"""The main job: train the demo adapter on the default model and show before / after.

Loads the model once, measures the base model's exact match on the held-out split, trains the
adapter as configs/demo.yaml says, measures again, and prints the two accuracies and a few
generations side by side, then the forgetting check (base vs adapter perplexity and KL on the
general text shipped with lorakit, eval/forgetting.py). The report also goes to
output_dir/demo_report.json.
"""

from __future__ import annotations

import json
import textwrap
import time
from pathlib import Path

from .data import load_records
from .eval.forgetting import describe, forgetting
from .eval.generation import exact_match, prompt_and_answer
from .train import load_run


def run_demo(config_path: str | Path = "configs/demo.yaml", overrides: list[str] = (), samples: int = 6) -> dict:
    from .models.load import load_model
    from .train import train

    cfg = load_run(config_path, overrides=list(overrides))
    t0 = time.time()
    print(f"lorakit demo: loading {cfg.model} ...", flush=True)
    model, tokenizer = load_model(cfg.model)
    rows = load_records(cfg.data.eval)
    print(f"lorakit demo: {len(rows)} held-out examples; evaluating the base model", flush=True)
    base = exact_match(model, tokenizer, rows, progress=True)
    t_base = time.time()
    result = train(cfg, model=model, tokenizer=tokenizer, overwrite=True)  # a demo re-run keeps the last one aside
    t_train = time.time()
    tuned = exact_match(model, tokenizer, rows, progress=True)
    print("lorakit demo: the forgetting check on general text", flush=True)
    drift = forgetting(model, tokenizer)
    t_end = time.time()
    report = {"model": cfg.model, "n": len(rows), "base_exact_match": base["exact_match"],
              "adapter_exact_match": tuned["exact_match"],
              "gain_points": 100 * (tuned["exact_match"] - base["exact_match"]),
              "seconds": {"load_and_base_eval": round(t_base - t0, 1), "train": round(t_train - t_base, 1),
                          "adapter_eval": round(t_end - t_train, 1), "total": round(t_end - t0, 1)},
              "forgetting": drift, "train_steps": result.steps, "adapter_dir": str(result.output_dir)}
    _print_report(report, rows, base["samples"], tuned["samples"], samples)
    Path(result.output_dir, "demo_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _print_report(report: dict, rows: list, base: list, tuned: list, k: int) -> None:
    width = 36
    print()
    print("=" * (3 * width + 6))
    print(f"{'prompt':{width}s} | {'base model':{width}s} | {'with the LoRA adapter':{width}s}")
    print("-" * (3 * width + 6))
    for row, b, t in list(zip(rows, base, tuned))[:k]:
        prompt, _ = prompt_and_answer(row)
        text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        cells = [_wrap(text, width), _wrap(("✓ " if b["ok"] else "✗ ") + b["got"], width),
                 _wrap(("✓ " if t["ok"] else "✗ ") + t["got"], width)]
        height = max(len(c) for c in cells)
        for line in zip(*[c + [""] * (height - len(c)) for c in cells]):
            print(" | ".join(f"{x:{width}s}" for x in line))
        print(f"{'':{width}s} | {'expected: ' + b['expected']:{2 * width + 3}.{2 * width + 3}s}")
        print("-" * (3 * width + 6))
    s = report["seconds"]
    print(describe(report["forgetting"]))
    print(f"exact match on {report['n']} held-out examples: base {100 * report['base_exact_match']:.1f}% -> "
          f"adapter {100 * report['adapter_exact_match']:.1f}%  ({report['gain_points']:+.1f} points)")
    print(f"time: load + base eval {s['load_and_base_eval']} s, train {s['train']} s "
          f"({report['train_steps']} steps), adapter eval + forgetting check {s['adapter_eval']} s, total {s['total']} s")
    print(f"adapter (PEFT format): {report['adapter_dir']}")


def _wrap(text: str, width: int, lines: int = 3) -> list[str]:
    return (textwrap.wrap(" ".join(str(text).split()), width) or [""])[:lines]
