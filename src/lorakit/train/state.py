"""Training checkpoints: everything a run needs to continue exactly, written so that none is ever lost.

    output_dir/checkpoints/step-000120/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT format)
        optimizer.pt, scheduler.pt                       state dicts (loaded with weights_only=True)
        rng.pt                                           torch / CUDA / Python RNG states
        run.json                                         the resolved run config the state belongs to
        trainer_state.json                               step, epoch, micro-batch, best eval, tokens
    output_dir/checkpoints/latest                        name of the newest complete checkpoint

A checkpoint is built in a hidden temporary folder, flushed to disk and renamed into place; only then
is `latest` replaced (atomically). A live checkpoint is never deleted or rewritten: one that exists
for the same step is kept (nothing changed since it was written), and pruning spares the newest. So a
kill at any moment, SIGKILL right after SIGTERM included, leaves `latest` naming a complete
checkpoint; should it not (a disk error), resuming falls back to the newest complete one. Temporary
folders of killed saves are removed at the next save. A non-finite adapter is never saved as a
checkpoint. Nothing here is unpickled beyond torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..adapters import files
from ..atomic import atomic_write_text, disk_full_error
from ..errors import LorakitError

PARTS = ("adapter_config.json", files.WEIGHTS_NAME, "optimizer.pt", "scheduler.pt", "rng.pt", "trainer_state.json")
_STEP = re.compile(r"step-(\d{6})")


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    micro: int = 0  # micro-batches consumed in the current epoch
    tokens: int = 0  # tokens seen
    best_eval: float = float("inf")
    bad_evals: int = 0  # evals in a row without improvement (early stopping)


def checkpoints_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def is_complete(path: Path) -> bool:
    return path.is_dir() and all((path / part).is_file() for part in PARTS)


def save_training_checkpoint(out: Path, state: TrainState, model, optimizer, scheduler, run: dict | None = None,
                             keep: int = 2, tensors: dict | None = None, optimizer_state: dict | None = None) -> Path:
    """Write the checkpoint of `state` (step-NNNNNN), point `latest` at it, prune older ones to `keep`.
    tensors / optimizer_state: the adapter's tensors and the optimizer's state dict when already taken
    (full tensors gathered from a sharded model: distributed.Ranks); else read from model and optimizer."""
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".step-*"):  # temporary folders of saves that were killed
        shutil.rmtree(leftover, ignore_errors=True)
    name = f"step-{state.step:06d}"
    final = root / name
    if not is_complete(final):
        _refuse_non_finite(model, state.step, tensors)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
        try:
            _write(tmp, state, model, optimizer, scheduler, run, tensors, optimizer_state)
            if final.exists():  # a partial folder (a half-finished delete): not a checkpoint
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException as e:  # noqa: BLE001 - clean up, then raise (a clearer error for a full disk)
            shutil.rmtree(tmp, ignore_errors=True)
            raise disk_full_error(e, root, _checkpoint_bytes(model, optimizer)) or e
    atomic_write_text(root / "latest", name + "\n")
    _prune(root, keep, spare=name)
    return final


def _write(tmp: Path, state: TrainState, model, optimizer, scheduler, run: dict | None, tensors: dict | None,
           optimizer_state: dict | None) -> None:
    files.save_adapter(model, tmp, tensors=tensors)
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, tmp / "rng.pt")
    (tmp / "run.json").write_text(json.dumps(run or {}, indent=2, default=str))
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    for part in tmp.iterdir():  # on disk before the rename makes the folder a checkpoint
        with open(part, "rb") as f:
            os.fsync(f.fileno())


def _refuse_non_finite(model, step: int, tensors: dict | None = None) -> None:
    if tensors is not None:
        bad = files.non_finite(tensors)
    else:
        bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise LorakitError(f"not saving step {step}: adapter tensors hold NaN/Inf ({bad[:3]}); the previous "
                           "checkpoint stays the latest")


def _prune(root: Path, keep: int, spare: str) -> None:
    """Keep `spare` (the new latest) and the keep-1 newest checkpoints before it (keep 0: all of them);
    folders of later steps are left over from a run resumed from an earlier one, and go."""
    current = int(_STEP.fullmatch(spare).group(1))
    steps = sorted((int(m.group(1)), p) for p in root.iterdir()
                   if (m := _STEP.fullmatch(p.name)) and p.is_dir() and p.name != spare)
    older = [p for step, p in steps if step < current]
    doomed = [p for step, p in steps if step > current] + (older[:len(older) - (keep - 1)] if keep > 0 else [])
    for old in doomed:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint `latest` names if it is complete, else the newest complete one, else None."""
    root = checkpoints_dir(out)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if is_complete(named):
            return named
    complete = sorted(p for p in root.glob("step-??????") if _STEP.fullmatch(p.name) and is_complete(p))
    return complete[-1] if complete else None


def load_training_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[TrainState, dict]:
    """Restore adapter tensors, optimizer, scheduler and RNG states; returns the data position and the run
    config the checkpoint was written with ({} for checkpoints older than run.json)."""
    try:
        state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
        files.load_weights(model, path)
        optimizer.load_state_dict(_fit(torch.load(path / "optimizer.pt", weights_only=True), optimizer))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
        run = json.loads((path / "run.json").read_text()) if (path / "run.json").is_file() else {}
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
        raise LorakitError(f"checkpoint {path} could not be restored ({e}); it may come from another "
                           "config: resume with the same run config, or start without --resume") from None
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state, run


def _fit(saved: dict, optimizer) -> dict:
    """A saved optimizer state (full tensors, any world size) laid out as the optimizer's parameters are:
    a sharded parameter (FSDP2's DTensor) takes its shard of each of its state tensors."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, entry in saved.get("state", {}).items():
        p = params[int(i)] if int(i) < len(params) else None
        if isinstance(p, DTensor):
            saved["state"][i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                                 if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) else v
                                 for k, v in entry.items()}
    return saved


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _checkpoint_bytes(model, optimizer) -> int:
    """About what a checkpoint takes: the trainable tensors and the optimizer's state tensors."""
    params = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    states = sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return params + states
