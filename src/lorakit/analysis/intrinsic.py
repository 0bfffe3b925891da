"""Intrinsic dimension (Aghajanyan et al. 2020): how few trained numbers reach 90% of fine-tuning.

    measure(cfg, dims, over="adapter"|"model", said=False, reference="adapter"|"full", ...)
        base       the config's eval metric on the model as loaded (an adapter at init changes nothing)
        reference  the config's own adapter training (recipe.train, in OUT/reference) or full fine-tuning
        d points   for each d: a fresh copy of the model (with a fresh adapter for --over adapter),
                   its tensors trained as θ0 + P·θd (projection.py) through the ordinary loop for the
                   config's steps, then baked and evaluated
        d90        the smallest d whose improvement over the base is >= 90% of the reference's
    OUT/intrinsic.json holds every finished phase and is rewritten after each: a rerun with the same
    settings skips what is done (one d at a time); other settings in the same folder are refused.
    OUT/intrinsic.png: the metric against d (log x), with the base, the reference and the 90% line.

The metric is exact match (greedy completion == answer) when the eval records have prompts and answers,
else the eval loss (lower is better); --metric picks one.
"""

from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from ..adapters import manage
from ..atomic import atomic_write_text
from ..data import load_records, prepare, split_eval
from ..errors import LorakitError
from ..eval.generation import exact_match, prompt_and_answer
from ..eval.perplexity import loss_and_perplexity
from ..models import attention
from ..train import loop
from ..train.config import RunConfig, lora_config
from ..train.hooks import LogHook
from ..train.logbook import MetricsLog
from ..train.optim import build_scheduler
from ..train.recipe import device_and_precision, seed_everything, train
from ..train.rundir import run_record
from ..train.state import TrainState
from . import figure
from .projection import Projection

METRICS = {"exact_match": True, "eval_loss": False}  # name -> higher is better
REFERENCES = ("adapter", "full")


def d90(points: list[dict], base: float, reference: float, higher_is_better: bool,
        fraction: float = 0.9) -> int | None:
    """The smallest d whose gain over the base is >= fraction of the reference's; None if none is, or
    if the reference does not improve on the base."""
    sign = 1 if higher_is_better else -1
    gain = sign * (reference - base)
    if not gain > 0:
        return None
    for p in sorted(points, key=lambda p: p["d"]):
        if sign * (p["value"] - base) >= fraction * gain - 1e-12:
            return p["d"]
    return None


def measure(cfg: RunConfig, dims: list[int], over: str = "adapter", said: bool = False,
            reference: str = "adapter", metric: str | None = None, lr: float = 0.05,
            reference_lr: float | None = None, eval_limit: int | None = None, out: str | Path | None = None,
            model=None, tokenizer=None, progress: bool = True) -> dict:
    """Measure the metric for every d (see the module docstring); returns the summary (also in OUT)."""
    if reference not in REFERENCES:
        raise LorakitError(f"--reference {reference!r}: expected one of {', '.join(REFERENCES)}")
    if not dims or any(d < 1 for d in dims):
        raise LorakitError(f"--dims must be positive integers, got {dims}")
    out = Path(out or Path(cfg.output_dir) / f"intrinsic-{over}")
    device, autocast_dtype = device_and_precision(cfg.train)
    if model is None:
        from ..models.load import load_model
        model, tokenizer = load_model(cfg.model, dtype=torch.float32 if device.type == "cpu" else None, device=device)
    rows, train_ds, eval_ds = _data(cfg, tokenizer, eval_limit)
    metric = metric or _default_metric(rows)
    if metric not in METRICS:
        raise LorakitError(f"--metric {metric!r}: expected one of {', '.join(METRICS)}")
    settings = _settings(cfg, over, said, reference, metric, lr, reference_lr, eval_limit)
    summary = _load_summary(out, settings)
    ev = lambda m: _evaluate(metric, m, tokenizer, rows, eval_ds, cfg.train.batch_size)  # noqa: E731
    fit = dict(cfg=cfg, train_ds=train_ds, device=device, autocast_dtype=autocast_dtype, progress=progress)

    if "base" not in summary:
        _say(progress, f"lorakit: base {metric} ...")
        summary["base"] = ev(model)
        _save(out, summary)
    if "reference" not in summary:
        _say(progress, f"lorakit: reference run ({reference}) ...")
        started = time.time()
        summary["reference"] = ev(_reference(cfg, model, tokenizer, reference, reference_lr, out, fit))
        summary["reference_seconds"] = round(time.time() - started, 1)
        _save(out, summary)
    for d in dims:
        if str(d) in summary["points"]:
            _say(progress, f"lorakit: d={d} done already ({metric} {summary['points'][str(d)]['value']:.4g})")
            continue
        _say(progress, f"lorakit: d={d} ...")
        summary["points"][str(d)] = _point(cfg, model, over, d, said, lr, ev, out, fit)
        _save(out, summary)
    return _finish(summary, out, metric)


def _point(cfg, model, over, d, said, lr, ev, out: Path, fit: dict) -> dict:
    """Train one d on a fresh copy of the model; its metric, loss, time and what was projected."""
    started = time.time()
    work = copy.deepcopy(model)
    if over == "adapter":
        seed_everything(cfg.train.seed)  # the same A init as the reference run's
        manage.add_adapter(work, lora_config(cfg))
        for p in work.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    proj = Projection(work, over, d, said, seed=cfg.train.seed)
    loss = _fit(work, list(proj.space.parameters()), lr, out / f"d-{d}" / "metrics.jsonl", **fit)
    proj.bake()
    value = ev(work)
    theta = proj.space.theta.detach().cpu()
    return {"d": d, "value": value, "train_loss": loss, "seconds": round(time.time() - started, 1),
            "tensors": len(proj.found), "projected": proj.total, "theta_norm": float(theta.norm())}


def _reference(cfg: RunConfig, model, tokenizer, reference: str, reference_lr, out: Path, fit: dict):
    """The trained reference model: the config's adapter run (its own folder), or all weights trained."""
    work = copy.deepcopy(model)
    if reference == "adapter":
        ref = copy.deepcopy(cfg)
        ref.output_dir = str(out / "reference")
        if reference_lr is not None:
            ref.train.learning_rate = reference_lr
        train(ref, progress=fit["progress"], model=work, tokenizer=tokenizer, overwrite=True)
        return work
    for p in work.parameters():
        p.requires_grad_(True)
    params = list({id(p): p for p in work.parameters()}.values())
    _fit(work, params, reference_lr or 5e-5, out / "reference" / "metrics.jsonl", **fit)
    return work


def _fit(model, params, lr: float, log_path: Path, cfg: RunConfig, train_ds, device, autocast_dtype,
         progress: bool) -> float:
    """AdamW over `params` through the training loop for the config's steps; the last step's loss."""
    t = cfg.train
    steps = t.max_steps or max(1, math.ceil((t.epochs or 1) * math.ceil(len(train_ds) / t.batch_size) / t.grad_accum))
    seed_everything(t.seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, t.warmup_steps, steps, t.schedule)
    state = TrainState()
    flat = t.flat_batches and attention.supports(model)
    micro = loop.micro_batches(train_ds, t.batch_size, t.seed, state, t.group_by_length, torch.float32, flat)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(log_path, truncate_after_step=0)
    hook = LogHook(log, steps, t.log_every, progress)
    try:
        loop.run(model, optimizer, scheduler, micro, steps=steps, state=state, grad_accum=t.grad_accum,
                 device=device, autocast_dtype=autocast_dtype, max_grad_norm=t.max_grad_norm, hooks=[hook])
    finally:
        hook.close()
        log.close()
    return hook.last_loss


# -- data, metric, files ----------------------------------------------------------------------------

def _data(cfg: RunConfig, tokenizer, eval_limit: int | None):
    d = cfg.data
    train_records = load_records(d.train, on_error=d.on_error)
    rows = load_records(d.eval, on_error=d.on_error) if d.eval else None
    if rows is None and d.eval_fraction:
        train_records, rows = split_eval(train_records, d.eval_fraction, cfg.train.seed)
    if not rows:
        raise LorakitError("intrinsic-dim needs evaluation data: set data.eval (a file) or data.eval_fraction")
    rows = list(rows)[:eval_limit] if eval_limit else list(rows)
    prep = dict(tokenizer=tokenizer, max_length=d.max_length, train_on_prompt=d.train_on_prompt)
    return rows, prepare(train_records, pack=d.pack, **prep), prepare(rows, pack=False, **prep)


def _default_metric(rows) -> str:
    try:
        prompt_and_answer(rows[0])
        return "exact_match"
    except LorakitError:
        return "eval_loss"


def _evaluate(metric: str, model, tokenizer, rows, eval_ds, batch_size: int) -> float:
    if metric == "exact_match":
        return float(exact_match(model, tokenizer, rows, batch_size=16)["exact_match"])
    return float(loss_and_perplexity(model, eval_ds, batch_size)["loss"])


def _settings(cfg, over, said, reference, metric, lr, reference_lr, eval_limit) -> dict:
    run = {k: v for k, v in run_record(cfg).items() if k not in ("name", "output_dir")}
    return {"over": over, "said": said, "reference": reference, "metric": metric, "lr": lr,
            "reference_lr": reference_lr, "eval_limit": eval_limit, "run": json.loads(json.dumps(run))}


def _load_summary(out: Path, settings: dict) -> dict:
    path = out / "intrinsic.json"
    if not path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        return {"settings": settings, "points": {}}
    summary = json.loads(path.read_text())
    if summary.get("settings") != settings:
        old = summary.get("settings", {})
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise LorakitError(f"{path} holds a measurement with other settings ({', '.join(diff)} differ); "
                           "give another --out folder, or delete that one to start over")
    return summary


def _save(out: Path, summary: dict) -> None:
    atomic_write_text(out / "intrinsic.json", json.dumps(summary, indent=2) + "\n")


def _finish(summary: dict, out: Path, metric: str) -> dict:
    higher = METRICS[metric]
    points = sorted(summary["points"].values(), key=lambda p: p["d"])
    result = {"metric": metric, "higher_is_better": higher, "base": summary["base"],
              "reference": summary["reference"], "points": [{"d": p["d"], "value": p["value"]} for p in points],
              "d90": d90(points, summary["base"], summary["reference"], higher)}
    summary["result"] = result
    _save(out, summary)
    plot(result, out / "intrinsic.png")
    return result


def plot(result: dict, png: Path) -> Path:
    """The metric against d (log x); the base, the reference and the 90% level as lines; d90 marked."""
    plt = figure.pyplot(png)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ds, vs = [p["d"] for p in result["points"]], [p["value"] for p in result["points"]]
    ax.plot(ds, vs, "o-", label="subspace θ0 + P·θd")
    base, ref = result["base"], result["reference"]
    ax.axhline(base, color="grey", ls=":", label=f"base {base:.3g}")
    ax.axhline(ref, color="green", ls="--", label=f"reference {ref:.3g}")
    ax.axhline(base + 0.9 * (ref - base), color="orange", ls="-.", label="90% of the reference's gain")
    if result["d90"] is not None:
        ax.axvline(result["d90"], color="red", alpha=0.5, label=f"d90 = {result['d90']}")
    ax.set_xscale("log")
    ax.set_xlabel("d (trained numbers)")
    ax.set_ylabel(result["metric"])
    ax.set_title("intrinsic dimension")
    ax.legend(fontsize=7)
    return figure.save(fig, png)


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, flush=True)
