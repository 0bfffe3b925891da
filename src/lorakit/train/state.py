"""Training checkpoints: everything a run needs to continue exactly, written atomically.

    output_dir/checkpoints/step-000120/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT format)
        optimizer.pt, scheduler.pt                       state dicts (loaded with weights_only=True)
        rng.pt                                           torch / CUDA / Python RNG states
        trainer_state.json                               step, epoch, micro-batch, best eval, tokens
    output_dir/checkpoints/latest                        name of the newest complete checkpoint

A checkpoint is built in a hidden temporary folder and renamed into place, then `latest` is
replaced atomically: a crash at any moment leaves the previous checkpoint usable. Nothing here is
unpickled beyond torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..adapters import files
from ..atomic import atomic_write_text
from ..errors import LorakitError


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    micro: int = 0  # micro-batches consumed in the current epoch
    tokens: int = 0  # tokens seen
    best_eval: float = float("inf")
    bad_evals: int = 0  # evals in a row without improvement (early stopping)


def _dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def save_training_checkpoint(out: Path, state: TrainState, model, optimizer, scheduler, keep: int = 2,
                             tag: str | None = None) -> Path:
    root = _dir(out)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{state.step:06d}" + (f"-{tag}" if tag else "")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    files.save_adapter(model, tmp)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    rng = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save(rng, tmp / "rng.pt")
    (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=2))
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if tag is None:
        atomic_write_text(root / "latest", name + "\n")
        _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-??????") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    pointer = _dir(out) / "latest"
    if not pointer.exists():
        return None
    path = _dir(out) / pointer.read_text().strip()
    return path if (path / "trainer_state.json").exists() else None


def load_training_checkpoint(path: Path, model, optimizer, scheduler) -> TrainState:
    """Restore adapter tensors, optimizer, scheduler and RNG states; returns the data position."""
    try:
        state = TrainState(**json.loads((path / "trainer_state.json").read_text()))
        files.load_weights(model, path)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng = torch.load(path / "rng.pt", weights_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise LorakitError(f"checkpoint {path} could not be restored ({e}); it may come from another "
                           "config: resume with the same run config, or start without --resume") from None
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
