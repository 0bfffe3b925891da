"""What the trainer hangs on the loop: the logbook and progress bar, evaluation, checkpoints.

Each is a loop.Hook; recipe.train wires them from a RunConfig, and anything else that drives the loop
(a sweep, a distributed launcher) can pick the ones it wants or bring its own.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..adapters import files
from ..eval.perplexity import loss_and_perplexity
from .logbook import MetricsLog
from .loop import Hook, Step
from .state import TrainState, checkpoints_dir, save_training_checkpoint


class LogHook(Hook):
    """Every log_every steps (and the last one) a metrics.jsonl row; a tqdm bar with loss, tokens/s, ETA."""

    def __init__(self, log: MetricsLog, total_steps: int, log_every: int = 1, progress: bool = True,
                 initial: int = 0):
        self.log, self.total, self.every = log, total_steps, log_every
        self.started = time.time()
        self.last_loss = float("nan")  # the latest step's loss
        self.bar = None
        if progress:
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total_steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def after_step(self, state: TrainState, step: Step) -> None:
        self.last_loss = step.loss
        tok_s = step.tokens / max(step.seconds, 1e-9)
        if step.step % self.every == 0 or step.step == self.total:
            self.log.write(step=step.step, loss=step.loss, lr=step.lr, grad_norm=step.grad_norm,
                           tokens=state.tokens, tokens_per_s=tok_s, elapsed_s=time.time() - self.started)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{step.loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class EvalHook(Hook):
    """Every eval_every steps: eval loss and perplexity into the log; the best adapter by eval loss saved
    to output_dir/best; "early_stop" after `patience` evaluations without improvement (0: never)."""

    def __init__(self, model, dataset, log: MetricsLog | None, out: Path, every: int, batch_size: int,
                 patience: int = 0, trackers: list = (), measure=None, save=None):
        """log None: a rank other than 0 (it evaluates its share, writes nothing). measure(): the eval's
        {"loss", "perplexity"} (default loss_and_perplexity); save(directory): writes the best adapter."""
        self.model, self.dataset, self.log, self.out = model, dataset, log, Path(out)
        self.measure = measure or (lambda: loss_and_perplexity(self.model, self.dataset, self.batch_size))
        self.save = save or (lambda directory: files.save_adapter(self.model, directory))
        self.trackers = list(trackers)  # trackers.Tracker: each evaluation goes to them too
        self.every, self.batch_size, self.patience = every, batch_size, patience
        self.last: float | None = None  # the latest eval loss

    def after_step(self, state: TrainState, step: Step) -> str | None:
        if not self.every or step.step % self.every:
            return None
        self.evaluate(state)
        return "early_stop" if self.patience and state.bad_evals >= self.patience else None

    def evaluate(self, state: TrainState) -> float:
        result = self.measure()
        if self.log is not None:
            self.log.write(step=state.step, eval_loss=result["loss"], eval_perplexity=result["perplexity"])
        for tracker in self.trackers:
            tracker.record(state.step, {"eval/loss": result["loss"], "eval/perplexity": result["perplexity"]})
        if result["loss"] < state.best_eval - 1e-6:
            state.best_eval, state.bad_evals = result["loss"], 0
            self.save(self.out / "best")
        else:
            state.bad_evals += 1
        self.last = result["loss"]
        return self.last


class CheckpointHook(Hook):
    """A resumable checkpoint every save_every steps (0: none on the way) and when the loop stops, for any
    reason: an interrupted run continues from it, a finished one can be extended (--resume, more steps)."""

    def __init__(self, out: Path, model, optimizer, scheduler, every: int = 0, keep: int = 2, run: dict | None = None,
                 ranks=None):
        self.out, self.model, self.optimizer, self.scheduler = Path(out), model, optimizer, scheduler
        self.every, self.keep, self.run = every, keep, run  # run: the config record kept in each checkpoint
        self.ranks = ranks  # distributed.Ranks: every rank calls save (FSDP2 gathers), rank 0 writes

    def after_step(self, state: TrainState, step: Step) -> None:
        if self.every and step.step % self.every == 0:
            self.save(state)

    def on_stop(self, state: TrainState, reason: str) -> None:
        self.save(state)

    def save(self, state: TrainState) -> Path:
        if self.ranks is None or self.ranks.world == 1:
            return save_training_checkpoint(self.out, state, self.model, self.optimizer, self.scheduler, self.run,
                                            keep=self.keep)
        tensors, optimizer_state = self.ranks.adapter_tensors(self.model), self.ranks.optimizer_state(self.optimizer)
        path = checkpoints_dir(self.out) / f"step-{state.step:06d}"
        if self.ranks.main:
            path = save_training_checkpoint(self.out, state, self.model, self.optimizer, self.scheduler, self.run,
                                            keep=self.keep, tensors=tensors, optimizer_state=optimizer_state)
        self.ranks.barrier()  # the checkpoint is on disk before any rank goes on
        return path
