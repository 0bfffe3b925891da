"""The training loop: it takes built objects (a model, an optimizer, a scheduler, micro-batches) and
calls hooks; it loads nothing and decides nothing about files. recipe.py builds what it takes.

    per optimizer step: accumulate grad_accum micro-batches (every loss token weighs the same) ->
    check the loss -> clip -> optimizer and scheduler step -> hooks (log, evaluate, checkpoint) ->
    stop when the steps are done, a hook says so, or a stop was requested (Ctrl-C / SIGTERM)

Hooks see the TrainState (what a checkpoint must hold to continue exactly) and the Step just taken.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from ..data import batching
from ..errors import LorakitError
from ..eval.losses import token_loss_sum
from ..layers import recompute
from ..layers.gptq import refuse_inference_only
from ..models import attention
from .state import TrainState


class NonFiniteLoss(LorakitError):
    """A step's loss or gradient was not finite; it was not applied (the weights are the previous step's)."""


@dataclass
class Step:
    """What one optimizer step did."""

    step: int  # optimizer steps done, this one included
    loss: float  # mean loss per labelled token over the step's micro-batches
    grad_norm: float  # before clipping
    lr: float  # the learning rate after the step (first parameter group): what the next step uses
    tokens: int  # real tokens in the step's micro-batches
    seconds: float


class Hook:
    """Called by the loop; every method is optional. after_step may return a reason to stop."""

    def after_step(self, state: TrainState, step: Step) -> str | None:
        return None

    def on_stop(self, state: TrainState, reason: str) -> None:
        """The loop ends (after its last step) for `reason`: "done", a hook's reason, or "interrupted"."""


def micro_batches(dataset, batch_size: int, seed: int, state: TrainState, group_by_length: bool,
                  mask_dtype: torch.dtype, flat: bool, share: tuple[int, int] = (0, 1)) -> Iterator[tuple[dict, int]]:
    """Endless (micro-batch, real tokens in it) across epochs, from the state's data position (for
    resume); `flat`: one unpadded row per micro-batch (batching.collate(flat=True),
    attention.flat_attention). The tokens are the examples' (or packed rows') lengths: a padded
    batch of packed rows cannot tell its pad tail from an example by its 4-D mask.
    share (rank, world): the order is one process's with batch_size × world, and this rank takes its
    share of each global micro-batch (batching.share; an empty share is one unlabelled example), so the
    data position counts global micro-batches and means the same at any world size."""
    rank, world = share
    while True:
        for examples in batching.batch_examples(dataset, batch_size * world, seed, state.epoch, state.micro,
                                                group_by_length):
            state.micro += 1
            mine = batching.share(examples, rank, world) if world > 1 else examples
            real = sum(len(e["input_ids"]) for e in mine)
            yield batching.collate(mine or [batching.unlabelled(examples[0])], dataset.pad_id, mask_dtype, flat), real
        state.epoch, state.micro = state.epoch + 1, 0


class OneProcess:
    """What the loop asks of the processes it runs in, for one process: the model's own loss, local sums,
    nothing to hold back (train/distributed.py's Ranks answers the same for several)."""

    def loss_sum(self, model: nn.Module, batch: dict):
        return token_loss_sum(model, batch)

    def sum(self, *values):
        return values

    def accumulating(self):
        return contextlib.nullcontext()


def run(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, micro: Iterator[tuple[dict, int]], *,
        steps: int, state: TrainState, grad_accum: int = 1, device: torch.device | None = None,
        autocast_dtype: torch.dtype | None = None, max_grad_norm: float = 1.0, lean: bool = True,
        hooks: list[Hook] = (), stop_requested=lambda: False, ranks=None) -> str:
    """Train until state.step == steps; returns why it stopped ("done", a hook's reason, "interrupted").

    lean: store activations that backward can rebuild as recipes (recompute.rebuilt_activations; off
    for compiled layers). A step whose loss or gradient norm is not finite is not applied: the loop
    raises NonFiniteLoss with the model, optimizer, data position and RNG as they were after the
    previous step, so a checkpoint taken then is that step's.
    ranks: the processes of the run (OneProcess() by default; distributed.Ranks under torchrun): the loss
    is normalised by the labelled tokens of all of them, and stop_requested must agree across them.
    """
    ranks = ranks or OneProcess()
    device = device or next(model.parameters()).device
    refuse_inference_only(model)
    model.train()
    while state.step < steps:
        started = time.time()
        before = (state.epoch, state.micro, torch.get_rng_state(), random.getstate(),
                  torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        # -- forward and backward over the micro-batches -------------------------------------------------
        loss, tokens = accumulate(model, micro, grad_accum, device, autocast_dtype, lean, ranks)
        grad_norm = clip(model, max_grad_norm)
        # -- the guard: a non-finite loss or gradient is never applied -----------------------------------
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            state.epoch, state.micro = before[0], before[1]  # the state is the previous step's, exactly
            torch.set_rng_state(before[2])
            random.setstate(before[3])
            if before[4] is not None:
                torch.cuda.set_rng_state_all(before[4])
            what = f"loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {grad_norm}"
            raise NonFiniteLoss(f"{what} at step {state.step + 1} (loss {loss:.4g}); the step was not applied")
        # -- the update ----------------------------------------------------------------------------------
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step, state.tokens = state.step + 1, state.tokens + tokens
        step = Step(state.step, loss, grad_norm, scheduler.get_last_lr()[0], tokens, time.time() - started)
        # -- hooks: log, evaluate, checkpoint --------------------------------------------------------------
        reasons = [r for r in (h.after_step(state, step) for h in hooks) if r]
        if reasons or stop_requested():
            return _stop(hooks, state, reasons[0] if reasons else "interrupted")
    return _stop(hooks, state, "done")


def _stop(hooks, state: TrainState, reason: str) -> str:
    for h in hooks:
        h.on_stop(state, reason)
    return reason


def accumulate(model: nn.Module, micro, grad_accum: int, device, autocast_dtype, lean: bool = True,
               ranks=None) -> tuple[float, int]:
    """Forward/backward over grad_accum micro-batches; every loss token weighs the same, over all ranks:
    each rank divides its loss sum by the global count of labelled tokens (the engine then sums the
    gradients). Returns (mean loss per labelled token, real tokens), both over all ranks."""
    ranks = ranks or OneProcess()
    batches, tokens = [], 0
    for batch, n_tokens in (next(micro) for _ in range(grad_accum)):
        batches.append(batching.to_device(batch, device))
        tokens += n_tokens
    n_total = sum(int((b["labels"][:, 1:] != batching.IGNORE_INDEX).sum()) for b in batches)
    n_total, tokens = (int(x) for x in ranks.sum(n_total, tokens))
    loss_total = 0.0
    for i, batch in enumerate(batches):
        # a flat batch's attention holds over backward too: checkpointed layers run forward again there
        with (ranks.accumulating() if i < len(batches) - 1 else contextlib.nullcontext()), \
                attention.for_batch(model, batch):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None), \
                    (recompute.rebuilt_activations() if lean else contextlib.nullcontext()):
                loss_sum, _ = ranks.loss_sum(model, batch)
            (loss_sum / max(n_total, 1)).backward()
        loss_total += float(loss_sum.detach())
    (loss_total,) = ranks.sum(loss_total)
    return loss_total / max(n_total, 1), tokens


def clip(model: nn.Module, max_norm: float) -> float:
    """Clip the trainable gradients to max_norm (0: no clipping); returns their norm before clipping.
    Sharded gradients (FSDP2's DTensors): the norm is the full gradient's, the same on every rank."""
    params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
    if params and isinstance(params[0].grad, DTensor):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])  # a DTensor, as its grads
        if max_norm:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return float(norm.full_tensor())
    if not max_norm:
        return float(torch.norm(torch.stack([p.grad.norm() for p in params]))) if params else 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


class Signals:
    """Ctrl-C / SIGTERM ask the loop to stop after this step (`requested`); a second Ctrl-C aborts."""

    def __enter__(self):
        self.requested = False
        self._old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self._old:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\nlorakit: {signal.Signals(signum).name} received: saving a checkpoint after this step "
              "(Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)
        return False
