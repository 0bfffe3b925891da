"""What every benchmark report starts with: the machine, the versions, and the load it ran under."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

import torch


def machine_info(args, device) -> list[str]:
    """Markdown bullet lines: CPU, threads, library versions, device and dtype, load average at start."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    import peft
    import transformers

    import lorakit
    lines = [f"- CPU: {cpu}, {os.cpu_count()} logical CPUs, torch threads: {torch.get_num_threads()}",
             f"- torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
             f"lorakit {lorakit.__version__}, Python {platform.python_version()}",
             f"- device: {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
             + f", dtype {args.dtype}"]
    with contextlib.suppress(OSError):
        lines.append(f"- load average at start: {' '.join(open('/proc/loadavg').read().split()[:3])} "
                     "(the machine is shared; ratios are per-round and robust to it, absolute ms are not)")
    return lines


def write_report(path, text: str, log=print) -> None:
    """Print the markdown report and write it to `path` (folders created)."""
    print(text)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    log(f"wrote {path}")
