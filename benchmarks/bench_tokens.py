"""Decoding steps of the serving engine over many adapters: how the LoRA part runs, measured.

    python benchmarks/bench_tokens.py [--hidden 256 --layers 4] [--sequences 64] [--distinct 1 4 16 64]

One engine (no HTTP), `sequences` requests decoding together, request i on adapter i % k for k
distinct adapters per batch (k = 0: base only). Adapters are random: ranks 8 and 16 (--ranks) alternating,
half on q/k/v/o and half on all linear layers, all resident. Three ways to add the LoRA part of a
decoding step (engine.Engine lora_path):
    segments  one GEMM pair per adapter present per layer (TokenPlan's slices)
    ranks     each token's factors gathered from its rank's slot pool, two bmm per rank per layer
    padded    the same from one pool padded to the largest rank
    kernel    ranks, each group one call of the compiled BGMV kernel (layers/bgmv.py: factors read in
              place; the engine's default on CPU when it builds)
Reported: decode tokens per CPU-second of the engine thread (robust to other jobs on the machine;
median over `rounds`, interleaved, after a warm-up round that reads and attaches the adapters and
fills the slot pools), and each ratio to base only.
Model: Llama, SmolLM2's 49152-token vocabulary, hidden/layers as given, fp32, one torch thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def small_llama(hidden: int, layers: int, vocab: int = 49152):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def write_adapters(model, root: Path, n: int, ranks=(8, 16)) -> Path:
    """n random adapters: ranks alternating, q/k/v/o on even pairs and all-linear on odd pairs."""
    import lorakit
    for i in range(n):
        r = ranks[i % len(ranks)]
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if (i // 2) % 2 == 0 else "all-linear"
        lorakit.add_adapter(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                      init_lora_weights=False), "x")
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.05)
        lorakit.save_adapter(model, root / f"r{i:04d}", "x")
        lorakit.delete_adapter(model, "x")
    return root


class Tok:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return ""


def decode_rate(engine, names: list[str], prompt_len: int, new: int) -> float:
    from lorakit.serve.engine import Request
    from lorakit.serve.sampling import SamplingParams
    for i, name in enumerate(names):
        prompt = [(7 * i + j) % 1000 + 1 for j in range(prompt_len)]
        engine.submit(Request(prompt, name, SamplingParams(max_tokens=new, temperature=0), lambda d: None))
    while engine.waiting or engine.inbox.qsize() or any(r.kv.length < len(r.prompt_ids) for r in engine.running):
        engine.step()  # prefill (and the loads) done
    steps, t0 = 0, time.thread_time()  # CPU time of this thread: robust to other jobs on the machine
    while engine.running:
        engine.step()
        steps += 1
    return steps * len(names) / (time.thread_time() - t0)


def main() -> None:
    from lorakit.layers import BASE
    from lorakit.serve.engine import Engine
    from lorakit.serve.registry import Registry
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sequences", type=int, default=64)
    p.add_argument("--distinct", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--paths", nargs="+", default=["segments", "ranks", "padded", "kernel"])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16], help="adapter ranks, in turn")
    p.add_argument("--gather-min", type=int, default=4, help="short slices of a rank from which the pool paths "
                   "gather (1: always, to compare the paths at few adapters)")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = small_llama(args.hidden, args.layers)
    root = write_adapters(model, Path(tempfile.mkdtemp(prefix="bench_tokens_")), max(args.distinct), args.ranks)
    registry = Registry(model, root, "base", max_loaded=max(args.distinct))
    cases = [("base", 0)] + [(path, k) for k in args.distinct for path in args.paths]
    rates: dict = {c: [] for c in cases}
    engines = {}
    for path in ["segments", *args.paths]:  # one engine (and its slot pools) per path, reused
        engines[path] = Engine(model, Tok(), registry, max_batch_tokens=4096, max_running=args.sequences,
                               lora_path="ranks" if path == "kernel" else path, gather_min=args.gather_min,
                               kernel="auto" if path == "kernel" else "off")
        engines[path].eos = set()
    for round_ in range(args.rounds + 1):  # round 0 warms up: reads, attaches, pool slots
        for path, k in cases:
            names = [BASE if k == 0 else f"r{i % k:04d}" for i in range(args.sequences)]
            rate = decode_rate(engines["segments" if path == "base" else path], names, 16, args.new_tokens)
            if round_:
                rates[(path, k)].append(rate)
    base = statistics.median(rates[("base", 0)])
    print(json.dumps({"model": f"llama hidden {args.hidden}, {args.layers} layers, vocab 49152", "ranks": args.ranks,
                      "sequences": args.sequences, "base_tok_s": round(base, 1)}))
    print("\n| distinct adapters | " + " | ".join(f"{p} tok/s (× base)" for p in args.paths) + " |")
    print("|---:|" + "---:|" * len(args.paths))
    for k in args.distinct:
        cells = []
        for path in args.paths:
            m = statistics.median(rates[(path, k)])
            cells.append(f"{m:.0f} ({m / base:.2f}×)")
        print(f"| {k} | " + " | ".join(cells) + " |")
    print(f"\nbase only: {base:.0f} tok/s; medians of {args.rounds} interleaved rounds")


if __name__ == "__main__":
    main()
