"""Writing files safely: atomically (a reader sees the old file or the new one, never half of either),
and never onto what was read (an output that is an input, or sits inside an input folder, is refused)."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LorakitError


def atomic_write(path: str | Path, write) -> None:
    """Call write(tmp_path) for a temporary file next to `path`, then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: Path(p).write_text(text))


def refuse_output_onto_inputs(out: str | Path, inputs, what: str) -> None:
    """LorakitError if `out` is one of `inputs` (files or folders) or inside one of them."""
    target = Path(out).expanduser().resolve()
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if target == source or source in target.parents:
            raise LorakitError(f"{what} would be written to {out}, which is (or is inside) the input "
                               f"{given}: outputs never overwrite inputs; choose another output folder")


def disk_full_error(e: BaseException, where: Path, needed: int):
    """A LorakitError naming the disk and the space needed if `e` is a write that ran out of space, else
    None. torch.save reports a full disk as RuntimeError("... unexpected pos N vs M") or "file write failed",
    safetensors as SafetensorError("... No space left on device (os error 28)")."""
    text = str(e)
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left on device" in text \
        or (isinstance(e, RuntimeError) and ("unexpected pos" in text or "write failed" in text))
    if not full:
        return None
    where = Path(where)
    while not where.exists() and where != where.parent:
        where = where.parent
    usage = shutil.disk_usage(where)
    return LorakitError(f"the disk holding {where} is full ({usage.free / 2**20:.2f} MiB free of "
                        f"{usage.total / 2**20:.1f} MiB; this write needs about {needed / 2**20:.2f} MiB): free "
                        "some space or write to another disk (a run: --resume from its last checkpoint)")
