"""Shared by the benchmarks: the machine header of every report, interleaved timing with per-round
ratios, and peak-memory probes (tensor bytes via the profiler, process RSS via the kernel's high-water
mark)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


# SmolLM2-135M-Instruct's shape (the default model): the benchmarks' "real size" random Llama
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048)

def omp_wait_policy(argv: list[str]) -> str:
    """Set OMP_WAIT_POLICY before torch loads OpenMP (default PASSIVE; --omp-wait passive|active|default).

    PASSIVE: idle OpenMP threads sleep instead of spinning; with several jobs on 2 cores, spinning threads
    starve each other and made every forward ~4x slower and erratic. Call before importing torch."""
    if "torch" in sys.modules:
        return os.environ.get("OMP_WAIT_POLICY", "? (torch was imported first)")
    policy = "passive"
    for i, a in enumerate(argv):
        if a == "--omp-wait" and i + 1 < len(argv):
            policy = argv[i + 1]
        elif a.startswith("--omp-wait="):
            policy = a.split("=", 1)[1]
    if policy != "default":
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return os.environ.get("OMP_WAIT_POLICY", "default (unset)")


def machine_info(args, device) -> list[str]:
    """Markdown bullet lines: CPU, threads, library versions, device and dtype, load average at start."""
    cpu = platform.processor() or "?"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    import peft
    import torch
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


def sync(device) -> None:
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize(device)


# -- timing --------------------------------------------------------------------------------------------

def interleaved(variants: dict, args, device, budget_s: float) -> tuple[dict, dict]:
    """Run every variant once per round, the order reversed every other round (A B C, C B A, ...: each
    variant sits next to the one it is compared with, on either side), after `args.warmup` untimed rounds;
    at least args.min_rounds and at most args.max_rounds timed rounds, stopping once budget_s is spent.
    Returns {"wall": ..., "cpu": ...}: seconds per call per variant, wall and process CPU time."""
    names = list(variants)
    wall, cpu = {n: [] for n in names}, {n: [] for n in names}
    r, deadline = 0, None
    while True:
        timed = r - args.warmup
        if timed == 0:
            deadline = time.perf_counter() + budget_s
        if timed >= args.max_rounds or (timed >= args.min_rounds and time.perf_counter() > deadline):
            break
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            gc.collect()
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            variants[n]()
            sync(device)
            if timed >= 0:
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
        r += 1
    return {"wall": wall, "cpu": cpu}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) < 4:
        return xs[0], statistics.median(xs), xs[-1]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[1], q[2]


def ratio(times: dict, num: str, den: str) -> dict:
    per_round = [a / b for a, b in zip(times[num], times[den])]
    lo, med, hi = quartiles(per_round)
    return {"median": med, "q1": lo, "q3": hi, "rounds": per_round}


def ms(times: dict, name: str) -> float:
    return 1000 * statistics.median(times[name])


def peak_step_memory(step, device) -> int:
    """Peak bytes of live tensors allocated during step() above the level before it."""
    import torch
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0]
    return max(totals) if totals else 0




def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def fixed_mmap_threshold(nbytes: int = 1 << 16) -> bool:
    """Make glibc give every block of >= nbytes its own mmap, returned to the OS on free, so RSS follows
    the live tensors instead of malloc's cache (glibc otherwise raises the threshold as big blocks are
    freed and keeps them in the heap). Call once at start-up; False where there is no glibc."""
    libc = _libc()
    return bool(libc and libc.mallopt(-3, nbytes))  # -3 = M_MMAP_THRESHOLD


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss_growth(step) -> int | None:
    """Peak process RSS during step() above the RSS just before it, in bytes (Linux): malloc_trim, then
    reset the kernel's high-water mark (/proc/self/clear_refs = 5), run, read VmHWM. None if unsupported."""
    gc.collect()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib("VmRSS")
    except OSError:
        return None
    step()
    return (_status_kib("VmHWM") - before) * 1024
