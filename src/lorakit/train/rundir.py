"""A run's folder and its continuity: one run per output_dir, and what may change when a run resumes.

    claim(out, resume, overwrite)   a new run refuses a folder that holds another run's files (its
                                    checkpoints would be pruned, its metrics lost), unless overwrite:
                                    then the old run is moved aside whole, never deleted
    run_record(cfg)                 what a checkpoint keeps of the config: the resolved keys, and a
                                    fingerprint of each data file
    resume_changes(saved, now)      on --resume: keys that define the data stream or the model must be
                                    the checkpoint's (refused otherwise, every difference listed); the
                                    update's hyper-parameters and the run's length may change, and are
                                    applied and reported
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from ..errors import LorakitError
from .config import RunConfig

# Files that mean "a run lives here" (checkpoints/ counts when it holds a checkpoint).
_RUN_FILES = ("run.yaml", "metrics.jsonl", "checkpoints/step-*", "adapter_model.safetensors")
# Keys that may differ on resume: applied from the resumed step on (the schedule is recomputed).
MAY_CHANGE = {"name", "output_dir", "train.max_steps", "train.epochs", "train.learning_rate", "train.weight_decay",
              "train.max_grad_norm", "train.warmup_steps", "train.schedule", "train.lora_plus_ratio",
              "train.eval_every", "train.early_stopping_patience", "train.save_every", "train.keep_checkpoints",
              "train.log_every", "train.report_to", "train.device", "train.precision", "train.compile", "train.gradient_checkpointing",
              "train.flat_batches", "train.distributed", "train.distributed_timeout", "train.batch_size", "world_size",
              "model_kwargs.device_map", "model_kwargs.max_memory",  # placement: the same numbers
              "model_kwargs.offload_folder", "model_kwargs.attn_implementation"}
# train.batch_size is per process and may change with the world size, as long as their product, the
# global micro-batch that fixes the data order (and is not in MAY_CHANGE), stays the same.
GLOBAL_BATCH = "train.global_micro_batch"  # train.batch_size x world_size


def claim(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Make `out` this run's folder; returns where an older run was moved (overwrite), else None."""
    out = Path(out)
    held = [name for name in _RUN_FILES if any(out.glob(name))]
    if resume or not held:
        out.mkdir(parents=True, exist_ok=True)
        return None
    if not overwrite:
        raise LorakitError(f"{out} already holds a run ({', '.join(held)}); continue it with --resume, write "
                           f"to a new folder (--set output_dir=...), or start over with --overwrite (the old run "
                           "is kept, moved aside)")
    aside = out.with_name(f"{out.name}.previous-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while aside.exists():
        aside, n = aside.with_name(f"{aside.name.split('~')[0]}~{n}"), n + 1
    out.rename(aside)
    out.mkdir(parents=True)
    return aside


def fingerprint(path: str | None) -> str | None:
    """sha256 of a data file's bytes, or of a saved dataset folder's files (names and bytes); None for
    no file (or an hf: name: the Hub's data is not fingerprinted)."""
    if not path or not (Path(path).is_file() or Path(path).is_dir()):
        return None
    digest = hashlib.sha256()
    files = [Path(path)] if Path(path).is_file() else sorted(p for p in Path(path).rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != Path(path) else "").encode())
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def run_record(cfg: RunConfig, world_size: int = 1) -> dict:
    """The flattened config ("train.batch_size": 8, ...), the world size and the global micro-batch,
    and the data files' fingerprints."""
    flat = {}
    for key, value in cfg.to_dict().items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    flat["data.train.sha256"] = fingerprint(cfg.data.train)
    flat["data.eval.sha256"] = fingerprint(cfg.data.eval)
    flat["world_size"] = world_size
    flat[GLOBAL_BATCH] = cfg.train.batch_size * world_size
    return flat


def resume_changes(saved: dict, now: dict, checkpoint: Path) -> list[str]:
    """The keys that changed and may ("train.learning_rate: 0.0002 -> 5e-05"); raises if any other did."""
    if not saved:  # a checkpoint from before run records: nothing to compare
        return []
    if GLOBAL_BATCH not in saved:  # a record from before distributed training: one process
        saved = {"world_size": 1, GLOBAL_BATCH: saved.get("train.batch_size"), **saved}
    changed = sorted(k for k in set(saved) | set(now) if _plain(saved.get(k)) != _plain(now.get(k)))
    refused = [k for k in changed if k not in MAY_CHANGE]
    if GLOBAL_BATCH in refused:  # name what the user changed too: the batch size or the world size
        refused = sorted(set(refused) | {k for k in ("train.batch_size", "world_size") if k in changed})
    if refused:
        lines = [f"{k}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in refused]
        raise LorakitError(f"--resume from {checkpoint}: the run changed in what defines its data or its model:\n  "
                           + "\n  ".join(lines) + "\nresume with the checkpoint's values, or start a new run in "
                           "a new output_dir")
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed]


def _plain(value):
    """JSON's view of a value (a checkpoint's record went through JSON: tuples became lists)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
