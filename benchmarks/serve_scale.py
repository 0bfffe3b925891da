"""S-LoRA scale on loopback: a thousand adapters on disk, a working set resident, one base model.

    python benchmarks/bench_serve.py --adapters 1000 [--hidden 256 --layers 4] [--clients 32] [--rounds 4]
        [--max-tokens 32] [--resident 64] [--host-cache-bytes 128MB] [--repeats 2] [--curve 1 4 16 64]

One `lorakit serve` process (one torch thread) over N random adapters written to disk (ranks 8 and
16, q/k/v/o and all linear layers: four kinds in turn), `--max-loaded RESIDENT`, host cache
`--host-cache-bytes`. The same load generator as bench_serve.py (C clients, `rounds` streaming
completions each, temperature 0) sends, interleaved `repeats` times:
    base     every request to the base model (the reference)
    uniform  request i to an adapter drawn uniformly from all N
    zipf     request i to adapter k with probability ∝ 1/(k+1) (a seeded draw; rank order shuffled)
then the curve: 64 clients, request i to adapter i % k, so each batch holds k distinct adapters
(k = 1, 4, 16, 64; all k read and attached by a warm-up before the clock starts).
Throughput = completion tokens / wall; TTFT = arrival to first streamed chunk, p50 / p99.
Host memory: the server's own peak of adapter bytes in its host cache (lorakit_host_cache_peak_bytes)
against the budget, and the process RSS. Writes a JSON report and a plot (matplotlib) to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx

from bench_serve import PY, SHAPES, load, make_model, wait_ready

KINDS = [(8, ["q_proj", "k_proj", "v_proj", "o_proj"]), (16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
         (8, "all-linear"), (16, "all-linear")]


def write_adapters(model_dir: Path, root: Path, n: int) -> Path:
    """n random adapters in PEFT's format; adapter i is of kind i % 4 (KINDS), weights seeded by i."""
    import torch
    from safetensors.torch import load_file, save_file
    import lorakit
    from lorakit.models.load import load_model
    model, _ = load_model(str(model_dir))
    templates = []
    for k, (r, targets) in enumerate(KINDS):
        lorakit.add_adapter(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), "x")
        lorakit.save_adapter(model, root / f"_kind{k}", "x")
        lorakit.delete_adapter(model, "x")
        folder = root / f"_kind{k}"
        templates.append(((folder / "adapter_config.json").read_text(),
                          load_file(folder / "adapter_model.safetensors")))
    for k in range(len(KINDS)):
        for f in (root / f"_kind{k}").iterdir():
            f.unlink()
        (root / f"_kind{k}").rmdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        config, tensors = templates[i % len(KINDS)]
        folder = root / f"r{i:04d}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(config)
        save_file({key: torch.randn(t.shape, generator=g) * 0.05 for key, t in tensors.items()},
                  str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return root


def traffic(kind: str, n_adapters: int, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    if kind == "uniform":
        return [f"r{rng.randrange(n_adapters):04d}" for _ in range(n)]
    order = list(range(n_adapters))
    rng.shuffle(order)
    weights = [1 / (k + 1) for k in range(n_adapters)]
    return [f"r{order[k]:04d}" for k in rng.choices(range(n_adapters), weights=weights, k=n)]


def scrape(url: str, pid: int) -> dict:
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for name in ("host_cache_peak_bytes", "host_cache_bytes", "host_cache_capacity_bytes", "resident_adapters",
                 "resident_adapter_bytes", "adapter_reads_total", "adapter_attaches_total"):
        m = re.search(rf"^lorakit_{name} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else None
    status = Path(f"/proc/{pid}/status").read_text()
    out["rss_bytes"] = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
    out["rss_peak_bytes"] = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    return out


def main(n_adapters: int, argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="bench_serve.py --adapters N")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--resident", default="64")
    p.add_argument("--host-cache-bytes", default="128MB")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--curve", type=int, nargs="*", default=[1, 4, 16, 64])
    p.add_argument("--curve-clients", type=int, default=64)
    p.add_argument("--lora-path", default="ranks")
    p.add_argument("--port", type=int, default=8211)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "serve-scale"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="serve_scale_"))
    model = make_model(work / "model", {**SHAPES["tiny"], "hidden_size": args.hidden,
                                             "intermediate_size": 2 * args.hidden, "num_hidden_layers": args.layers})
    root = write_adapters(model, work / "adapters", n_adapters)
    disk = sum(f.stat().st_size for f in root.rglob("adapter_model.safetensors"))
    print(json.dumps({"model": f"Llama hidden {args.hidden}, {args.layers} layers, intermediate {2 * args.hidden}, "
                      "vocab 49152, fp32", "adapters": n_adapters, "adapter_bytes_on_disk": disk}), flush=True)
    cmd = [PY, "-m", "lorakit", "serve", "--model", str(model), "--adapters", str(root), "--threads", "1",
           "--port", str(args.port), "--max-loaded", args.resident, "--host-cache-bytes", args.host_cache_bytes,
           "--max-batch-tokens", "512", "--max-running", str(max(64, args.curve_clients)), "--max-queue", "1024",
           "--lora-path", args.lora_path]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"
    n_req = args.clients * args.rounds
    rows, curve = [], []
    try:
        wait_ready(url, proc)
        for rep in range(args.repeats):
            for kind in ("base", "uniform", "zipf"):
                models = [str(model)] if kind == "base" else traffic(kind, n_adapters, n_req, seed=rep)
                res = asyncio.run(load(url, models, args.clients, args.rounds, args.max_tokens, True))
                res.update(traffic=kind, repeat=rep, distinct=len(set(models)), **scrape(url, proc.pid))
                print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}), flush=True)
                rows.append(res)
        for k in args.curve:
            models = [str(model)] if k == 0 else [f"r{i % k:04d}" for i in range(k)]
            res = asyncio.run(load(url, models, args.curve_clients, 2, args.max_tokens, True, warm=models))
            res.update(distinct=k)
            print(json.dumps({kk: round(v, 4) if isinstance(v, float) else v for kk, v in res.items()}), flush=True)
            curve.append(res)
        base_curve = asyncio.run(load(url, [str(model)], args.curve_clients, 2, args.max_tokens, True))
    finally:
        proc.terminate()
        proc.wait(60)
    report(args, rows, curve, base_curve, n_adapters, disk, work)


def report(args, rows, curve, base_curve, n_adapters, disk, work) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    med = lambda kind, key: statistics.median(r[key] for r in rows if r["traffic"] == kind)
    base_tok, base_p99 = med("base", "tok_s"), med("base", "ttft_p99")
    print(f"\n| traffic ({args.clients} clients) | tok/s | × base | TTFT p50 (s) | TTFT p99 (s) | p99 × base |"
          "\n|---|---:|---:|---:|---:|---:|")
    for kind in ("base", "uniform", "zipf"):
        t, p99 = med(kind, "tok_s"), med(kind, "ttft_p99")
        print(f"| {kind} | {t:.0f} | {t / base_tok:.2f} | {med(kind, 'ttft_p50'):.3f} | {p99:.3f} | "
              f"{p99 / base_p99:.2f} |")
    last = rows[-1]
    print(f"\nhost cache: peak {last['host_cache_peak_bytes'] / 1e6:.1f} MB of "
          f"{last['host_cache_capacity_bytes'] / 1e6:.1f} MB budget; adapters on disk {disk / 1e6:.0f} MB; "
          f"reads {last['adapter_reads_total']:.0f}, attaches "
          f"{last['adapter_attaches_total']:.0f}; server RSS {last['rss_bytes'] / 1e6:.0f} MB (peak "
          f"{last['rss_peak_bytes'] / 1e6:.0f} MB)")
    print(f"\n| distinct adapters per batch ({args.curve_clients} clients) | tok/s | × base | TTFT p99 (s) |"
          "\n|---:|---:|---:|---:|")
    print(f"| 0 (base) | {base_curve['tok_s']:.0f} | 1.00 | {base_curve['ttft_p99']:.3f} |")
    for c in curve:
        print(f"| {c['distinct']} | {c['tok_s']:.0f} | {c['tok_s'] / base_curve['tok_s']:.2f} | {c['ttft_p99']:.3f} |")
    (out / "report.json").write_text(json.dumps({"args": vars(args), "rows": rows, "curve": curve,
                                                 "base_curve": base_curve, "adapters": n_adapters,
                                                 "disk_bytes": disk}, indent=1))
    plot(curve, base_curve, out / "throughput-vs-distinct.png", args)
    print(f"\nreport: {out / 'report.json'}; plot: {out / 'throughput-vs-distinct.png'}; server log: {work}/server.log")


def plot(curve, base_curve, path: Path, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ks = [c["distinct"] for c in curve]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(ks, [c["tok_s"] for c in curve], "o-", label="lorakit serve, k adapters")
    ax.axhline(base_curve["tok_s"], color="gray", ls="--", label="base only")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("distinct adapters per batch")
    ax.set_ylabel("output tokens / s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{args.curve_clients} clients, Llama h{args.hidden}×{args.layers}L, CPU 1 thread", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
