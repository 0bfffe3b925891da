"""The compiled BGMV kernel (bgmv.cpp) for gathered serving tokens on CPU: built on first use, or None.

TokenPlan's gather (tokens.py) copies each token's factors out of the slot pool (an index_select of A
and of B) and runs two batched matmuls; on CPU the copies cost more than the matmuls (docs/benchmarks.md,
serving). bgmv.cpp reads the factors in place, one call per rank group per layer. It is built with
torch's JIT extension builder (needs a C++ compiler and ninja, the `serve` extra) the first time a
process asks for it, into torch's extension cache (rebuilt when the source or flags change), under a
name that includes this CPU's instruction-set flags, since it is compiled for this CPU. When it
cannot be built, load() says why once and returns None; the torch gather then runs (the same sums up
to float rounding).
"""

from __future__ import annotations

import hashlib
import logging
import platform
import threading
from pathlib import Path

import torch

log = logging.getLogger("lorakit.serve")
SOURCE = Path(__file__).with_name("bgmv.cpp")


class _Built:
    """The process's one build attempt (a compiled module is process state, like an import)."""
    lock = threading.Lock()
    tried = False
    module = None
    why: str | None = None


def _cpu_tag() -> tuple[str, list[str]]:
    """(a name suffix, compiler flags): -march=native where /proc/cpuinfo names the CPU's flags, so that a
    cache shared between different machines never hands one a build for another's instruction set."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return platform.machine() or "cpu", []
    return hashlib.sha1(flags.encode()).hexdigest()[:10], ["-march=native"]


def load():
    """The built extension (its bgmv_(out, x, A, B, slot, lo)), or None with the reason logged once."""
    with _Built.lock:
        if not _Built.tried:
            _Built.tried = True
            try:
                _Built.module = _build()
            except Exception as e:  # no compiler, no ninja, a failed build: all mean "use the torch gather"
                _Built.why = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                log.warning("the compiled BGMV kernel for mixed-adapter decoding is not available (%s); the torch "
                            "gather runs instead (same results, slower on CPU). To build it, install a C++ compiler "
                            "and ninja (pip install 'lorakit[serve]'); --lora-kernel off skips it.", _Built.why)
        return _Built.module


def why_not() -> str | None:
    """Why load() returned None (None if it was not tried or succeeded)."""
    return _Built.why


def _build():
    from torch.utils import cpp_extension
    tag, flags = _cpu_tag()
    log.info("building the BGMV kernel for this CPU (once, about 30 s; cached by torch)")
    return cpp_extension.load(name=f"lorakit_bgmv_{tag}", sources=[str(SOURCE)], extra_cflags=["-O3", *flags],
                              verbose=False)


def usable(out2: torch.Tensor, x2: torch.Tensor, A: torch.Tensor) -> bool:
    """Whether the kernel takes this layer's step: fp32 on CPU throughout, rows contiguous, and nothing for
    autograd to follow (the kernel writes outside it); else the torch gather."""
    return (out2.dtype == x2.dtype == A.dtype == torch.float32 and A.device.type == "cpu" and x2.stride(-1) == 1
            and not (out2.requires_grad or x2.requires_grad))
