"""The recipe: build everything a run trains with from a RunConfig, then run the loop with its hooks.

    build(cfg)  -> Recipe: device and precision, the model with its adapter (quantized base, fp32
                   adapters, checkpointing, compile), the datasets, the optimizer and schedule
    train(cfg)  build, resume, run loop.run with the logbook / evaluation / checkpoint hooks, then
                finish: the adapter in PEFT format at the top of output_dir, run.yaml, loss.png

Everything a run needs to continue exactly is in a checkpoint (state.py): adapter tensors, optimizer
and scheduler state, RNG states and the data position; Ctrl-C or SIGTERM finishes the current step,
writes one, and exits cleanly.
"""

from __future__ import annotations

import dataclasses

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import files, manage
from ..atomic import atomic_write
from ..data import load_records, prepare, split_eval
from ..data.dataset import TokenizedDataset
from ..errors import LorakitError
from ..models import attention
from . import loop, rundir
from .config import RunConfig, TrainSection, lora_config
from .distributed import Ranks, start
from .hooks import CheckpointHook, EvalHook, LogHook
from .logbook import MetricsLog, plot_curves
from .optim import build_optimizer, build_scheduler
from .rundir import run_record
from .trackers import open_trackers
from .state import TrainState, latest_checkpoint, load_training_checkpoint


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    stopped: str  # "done" | "early_stop" | "interrupted"
    train_loss: float
    eval_loss: float | None
    seconds: float
    tokens: int


@dataclass
class Recipe:
    """The built objects of a run: what loop.run takes, plus what the hooks need."""

    model: torch.nn.Module
    tokenizer: object
    train_data: TokenizedDataset
    eval_data: TokenizedDataset | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    autocast_dtype: torch.dtype | None
    total_steps: int
    flat: bool  # flat batches (models/attention.py) for this model
    ranks: Ranks = field(default_factory=Ranks)  # the run's processes and their engine (one: no engine)


def build(cfg: RunConfig, model=None, tokenizer=None, ranks: Ranks | None = None) -> Recipe:
    """Everything the run trains with; `model`/`tokenizer` given: used instead of loading cfg.model.
    ranks (distributed.start): the model goes on this rank's device, inside DDP or FSDP2, and the
    optimizer is built over what the engine left (FSDP2: the shards)."""
    t = cfg.train
    ranks = ranks or Ranks()
    device, autocast_dtype = device_and_precision(t)
    device = ranks.device(device)
    seed_everything(t.seed)
    if model is None:
        from ..models.load import load_model
        model, tokenizer = load_model(cfg.model, dtype=torch.float32 if device.type == "cpu" else None,
                                      device=device, **_quant_kwargs(cfg), **_placement_kwargs(cfg))
    manage.add_adapter(model, lora_config(cfg))
    _adapters_to_fp32(model)
    if t.gradient_checkpointing:
        from ..models.speed import enable_checkpointing
        enable_checkpointing(model)
    if t.compile:
        from ..models.speed import compile_layers
        compile_layers(model)
    ranks.wrap(model, _shard_dtype(model, device, autocast_dtype))
    train_ds, eval_ds = datasets(cfg, tokenizer)
    micro_per_epoch = math.ceil(len(train_ds) / (t.batch_size * ranks.world))  # global micro-batches
    total_steps = t.max_steps or max(1, math.ceil((t.epochs or 1) * micro_per_epoch / t.grad_accum))
    optimizer = build_optimizer(model, t.learning_rate, t.weight_decay, t.lora_plus_ratio, t.optimizer)
    scheduler = build_scheduler(optimizer, t.warmup_steps, total_steps, t.schedule)
    flat = t.flat_batches and attention.supports(model)
    return Recipe(model, tokenizer, train_ds, eval_ds, optimizer, scheduler, device, autocast_dtype,
                  total_steps, flat, ranks)


def train(cfg: RunConfig, resume: bool = False, progress: bool = True, model=None, tokenizer=None,
          overwrite: bool = False) -> TrainResult:
    """Train one LoRA adapter as `cfg` says; returns where it went and how it ended.

    resume: continue from the latest complete checkpoint in output_dir. Otherwise output_dir must not
    hold another run, unless overwrite, which first moves that run aside (output_dir.previous-<time>).
    Under torchrun every process calls this; rank 0 alone writes files, logs and the progress bar.
    """
    t = cfg.train
    ranks = start(t.distributed, t.distributed_timeout, device_and_precision(t)[0])
    try:
        return _train(cfg, ranks, resume, progress and ranks.main, model, tokenizer, overwrite)
    finally:
        ranks.close()


def _train(cfg: RunConfig, ranks: Ranks, resume: bool, progress: bool, model, tokenizer,
           overwrite: bool) -> TrainResult:
    out, t, main = Path(cfg.output_dir), cfg.train, ranks.main
    refused = None
    if main:
        try:
            _claim(out, resume, overwrite, progress)
        except LorakitError as e:
            refused = e
    if ranks.any(refused is not None):  # every rank ends with the reason, none waits on a departed rank 0
        raise refused or LorakitError(f"rank 0 refused output_dir {out} (its error says why)")
    r = build(cfg, model, tokenizer, ranks)
    run = run_record(cfg, ranks.world)
    state = TrainState()
    if resume:
        state = _resume(out, r, run, progress)
    _seed_rank(t.seed, ranks, state)
    log = None
    if main:
        cfg.save(out / "run.yaml")
        log = MetricsLog(out / "metrics.jsonl", truncate_after_step=state.step if resume else None)
    _say(progress, f"lorakit: {manage.trainable_report(r.model)}")
    _say(progress, f"lorakit: train {r.train_data.stats.summary()}"
         + (f"; eval {r.eval_data.stats.summary()}" if r.eval_data else ""))
    _say(progress, f"lorakit: {ranks.describe()}; global batch {t.batch_size * t.grad_accum * ranks.world} = "
                   f"batch_size {t.batch_size} x grad_accum {t.grad_accum} x {ranks.world} process(es)")
    logging, evaluation, checkpoints, trackers = _hooks(cfg, r, out, run, log, state, progress)
    micro = loop.micro_batches(r.train_data, t.batch_size, t.seed, state, t.group_by_length,
                               _float_dtype(r.model), r.flat, ranks.share)
    started = time.time()
    try:
        with loop.Signals() as signals:
            stopped = loop.run(r.model, r.optimizer, r.scheduler, micro, steps=r.total_steps, state=state,
                               grad_accum=t.grad_accum, device=r.device, autocast_dtype=r.autocast_dtype,
                               max_grad_norm=t.max_grad_norm, lean=not t.compile,
                               hooks=[h for h in (logging, evaluation, checkpoints, *trackers) if h is not None],
                               stop_requested=lambda: ranks.any(signals.requested),
                               ranks=ranks if ranks.world > 1 else None)  # one: the loop's own path
    except loop.NonFiniteLoss as e:
        _close(trackers)
        raise _stopped_non_finite(e, out, r, state, checkpoints, t.learning_rate) from None
    except BaseException:
        _close(trackers)
        raise
    finally:
        if logging is not None:
            logging.close()
    # -- finish: the adapter first, so that nothing trained is lost if the final evaluation is cut short ---
    ranks.save_adapter(r.model, out)
    eval_loss = evaluation.last if evaluation is not None else None
    try:
        if evaluation is not None and stopped != "interrupted" and (not t.eval_every or state.step % t.eval_every):
            eval_loss = evaluation.evaluate(state)
    finally:
        _close(trackers)
    if main:
        log.close()
        _finish(cfg, out, use_best=evaluation is not None and stopped != "interrupted")
    ranks.barrier()
    seconds = time.time() - started
    _say(progress, f"lorakit: {stopped} after {state.step} steps in {seconds:.0f} s; adapter in {out}")
    return TrainResult(out, state.step, stopped, logging.last_loss if logging else float("nan"), eval_loss,
                       seconds, state.tokens)


def _hooks(cfg: RunConfig, r: Recipe, out: Path, run: dict, log, state: TrainState, progress: bool):
    """(logbook, evaluation, checkpoints, trackers). Rank 0 alone logs, tracks and shows the bar; every
    rank evaluates its share (the sums reduced) and takes part in each save (rank 0 writes)."""
    t, ranks = cfg.train, r.ranks
    trackers = open_trackers(t.report_to, out, run, cfg.name, t.log_every, r.total_steps) if ranks.main else []
    logging = LogHook(log, r.total_steps, t.log_every, progress, initial=state.step) if ranks.main else None
    evaluation = None
    if r.eval_data is not None:
        measure = save = None
        if ranks.world > 1:
            measure = lambda: ranks.evaluate(r.model, r.eval_data, t.batch_size, r.device)  # noqa: E731
            save = lambda directory: ranks.save_adapter(r.model, directory)  # noqa: E731
        evaluation = EvalHook(r.model, r.eval_data, log, out, t.eval_every, t.batch_size, t.early_stopping_patience,
                              trackers, measure=measure, save=save)
    checkpoints = CheckpointHook(out, r.model, r.optimizer, r.scheduler, t.save_every, t.keep_checkpoints, run, ranks)
    return logging, evaluation, checkpoints, trackers


def _seed_rank(seed: int, ranks: Ranks, state: TrainState) -> None:
    """Ranks other than 0 draw their own random numbers (dropout) from here on; rank 0 keeps the stream a
    single process would have (so one process stays bit-identical to before)."""
    if ranks.rank > 0:
        torch.manual_seed(seed * 1_000_003 + ranks.rank * 10_007 + state.step)
        random.seed(f"lorakit:{seed}:{ranks.rank}:{state.step}")


def _close(trackers) -> None:
    for tracker in trackers:
        tracker.close()


def _claim(out: Path, resume: bool, overwrite: bool, progress: bool) -> None:
    aside = rundir.claim(out, resume, overwrite)
    if aside is not None:
        _say(progress, f"lorakit: --overwrite: the previous run in {out} was moved to {aside}")


def _resume(out: Path, r: Recipe, run: dict, progress: bool) -> TrainState:
    """Load the latest complete checkpoint into the built objects; check and apply what changed."""
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise LorakitError(f"--resume: no checkpoint in {out / 'checkpoints'} (none complete); start without --resume")
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file() or pointer.read_text().strip() != ckpt.name:
        _say(progress, f"lorakit: checkpoints/latest does not name a complete checkpoint; resuming from the newest "
                       f"complete one, {ckpt.name}")
    saved = json.loads((ckpt / "run.json").read_text()) if (ckpt / "run.json").is_file() else {}
    changes = rundir.resume_changes(saved, run, ckpt)  # raises before anything is loaded
    fresh = [(g["initial_lr"], g.get("weight_decay")) for g in r.optimizer.param_groups]
    state, _ = load_training_checkpoint(ckpt, r.model, r.optimizer, r.scheduler)
    _apply_hyperparameters(r.optimizer, r.scheduler, fresh)
    for change in changes:
        _say(progress, f"lorakit: resuming with a changed {change} (applied from step {state.step + 1} on)")
    _say(progress, f"lorakit: resuming from {ckpt} (step {state.step})")
    return state


def _apply_hyperparameters(optimizer, scheduler, fresh: list[tuple[float, float | None]]) -> None:
    """The config's learning rates and weight decay over the restored optimizer and schedule (which load the
    checkpoint's): the schedule's position is kept, its base rates are the config's. Unchanged values give
    back exactly what was saved."""
    for group, (lr, decay) in zip(optimizer.param_groups, fresh):
        group["initial_lr"] = lr
        if decay is not None:
            group["weight_decay"] = decay
    scheduler.base_lrs = [lr for lr, _ in fresh]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def _stopped_non_finite(e: loop.NonFiniteLoss, out: Path, r: Recipe, state: TrainState,
                        checkpoints: CheckpointHook, lr: float) -> loop.NonFiniteLoss:
    """Save the last good state (the loop did not apply the bad step) and say how to go on."""
    path = checkpoints.save(state)
    r.ranks.save_adapter(r.model, out)
    return loop.NonFiniteLoss(f"{e}. Training stopped; the last good state (step {state.step}) is saved: "
                              f"checkpoint {path} (latest) and the adapter in {out}; lower train.learning_rate "
                              f"(now {lr}) or set train.max_grad_norm, then --resume")


# -- building blocks --------------------------------------------------------------------------------

def device_and_precision(t: TrainSection) -> tuple[torch.device, torch.dtype | None]:
    """The device, and the autocast dtype (None: no autocast, fp32)."""
    name = t.device if t.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if t.precision == "fp32" or (t.precision == "auto" and device.type == "cpu"):
        return device, None  # fp32 on CPU: fast there, and bf16 is slow
    if t.precision == "fp16":
        return device, torch.float16
    return device, torch.bfloat16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _quant_kwargs(cfg: RunConfig) -> dict:
    if cfg.lora.quantize == "none":
        return {}
    from ..models.quantize import quantization_config
    return {"quantization_config": quantization_config(cfg.lora.quantize)}


def _placement_kwargs(cfg: RunConfig) -> dict:
    """model_kwargs keys that are set, for from_pretrained (device_map with max_memory: accelerate offloads
    what does not fit; the adapters then live on each layer's compute device, adapters/placement.py)."""
    return {k: v for k, v in dataclasses.asdict(cfg.model_kwargs).items() if v is not None}


def _adapters_to_fp32(model) -> None:
    """Adapters train in fp32 even on a bf16 or quantized base (as PEFT's autocast_adapter_dtype)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()


def datasets(cfg: RunConfig, tokenizer) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """The run's train and eval datasets, encoded (eval held out from train when data.eval_fraction)."""
    d = cfg.data
    train_records = load_records(d.train, on_error=d.on_error)
    eval_records = load_records(d.eval, on_error=d.on_error) if d.eval else None
    if eval_records is None and d.eval_fraction:
        train_records, eval_records = split_eval(train_records, d.eval_fraction, cfg.train.seed)
    prep = dict(tokenizer=tokenizer, max_length=d.max_length, train_on_prompt=d.train_on_prompt)
    train_ds = prepare(train_records, pack=d.pack, **prep)
    eval_ds = prepare(eval_records, pack=False, **prep) if eval_records else None
    return train_ds, eval_ds


def _shard_dtype(model, device: torch.device, autocast_dtype: torch.dtype | None) -> torch.dtype | None:
    """FSDP2's compute dtype on CUDA (its all-gathers in the autocast dtype; the fp32 adapter masters
    stay sharded in fp32); None on CPU, where everything is fp32."""
    if device.type != "cuda":
        return None
    return autocast_dtype or _float_dtype(model)


def _float_dtype(model) -> torch.dtype:
    """The model's compute dtype (packed rows' attention masks must match it on CUDA)."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point and not p.requires_grad),
                torch.float32)


def _finish(cfg: RunConfig, out: Path, use_best: bool) -> None:
    """The adapter at the top of output_dir is the best one by eval loss when there was an evaluation
    (it holds the last one, saved already); the plot."""
    best = out / "best"
    if use_best and (best / files.WEIGHTS_NAME).exists():
        for name in (files.WEIGHTS_NAME, "adapter_config.json"):
            data_bytes = (best / name).read_bytes()
            atomic_write(out / name, lambda p, b=data_bytes: Path(p).write_bytes(b))
    plot_curves(out / "metrics.jsonl", out / "loss.png", title=f"lorakit: {cfg.name} ({cfg.model})")


def _say(enabled: bool, text: str) -> None:
    if enabled:
        print(text, flush=True)
