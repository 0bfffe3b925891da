"""Training on several processes (torchrun, gloo on CPU): N processes give one process's adapter, a
checkpoint from 2 processes resumes in 1 and in 2, a failing rank ends the launcher, named, in bounded time.

Each launch is `python -m torch.distributed.run --standalone --nproc_per_node 2 ...` in a child with a
timeout; the one-process references run in this process. The data has 17 examples, so with 8 to a global
micro-batch the last one gives rank 1 nothing (it runs an unlabelled example: batching.unlabelled).
"""

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LorakitError
from lorakit.data import batching
from lorakit.train import load_run, train

from conftest import WORDS

slow = pytest.mark.slow  # each launch starts two interpreters with torch (20-60 s on 2 busy cores)

# Runs train() for each [output_dir, resume, overrides...] given, in one process group set up here (so
# train() uses it and leaves it open); FAULT=1: rank 1 raises in its third forward.
WORKER = """
import json, os, sys, torch
import torch.distributed as dist
from lorakit.train import load_run, train
dist.init_process_group("gloo")
for out, resume, *overrides in json.loads(sys.argv[1]):
    cfg = load_run(None, overrides=[*overrides, f"output_dir={out}"])
    model = None
    if os.environ.get("FAULT") == "1" and dist.get_rank() == 1:
        from transformers import AutoModelForCausalLM
        model, calls = AutoModelForCausalLM.from_pretrained(cfg.model), []
        def fault(module, args, kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("injected fault in the third forward")
        model.model.register_forward_pre_hook(fault, with_kwargs=True)  # the decoder: the loss path calls it
    from transformers import AutoTokenizer
    train(cfg, resume=resume, progress=False, model=model,
          tokenizer=AutoTokenizer.from_pretrained(cfg.model) if model is not None else None)
dist.destroy_process_group()
"""


def _launch(args: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    import os
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _worker(tmp_path, runs: list, **kw) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return _launch([str(script), json.dumps(runs)], **kw)


@pytest.fixture(scope="module")
def data17(tmp_path_factory):
    """17 records of different lengths (length grouping has something to group)."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    words = (WORDS * 3)[:17]
    path.write_text("".join(json.dumps({"prompt": f"Shout {w}" + " please" * (i % 4), "completion": w.upper() + "!"})
                            + "\n" for i, w in enumerate(words)))
    return path


def _overrides(tiny_model_dir, data, *extra):
    return [f"model={tiny_model_dir}", f"data.train={data}", "train.learning_rate=1e-2", "lora.r=4",
            "train.warmup_steps=1", "train.schedule=constant", "data.max_length=64", *extra]


def _max_diff(a_dir, b_dir) -> float:
    a, b = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_share_splits_a_global_batch_in_order():
    examples = [{"input_ids": [i], "labels": [i]} for i in range(9)]
    parts = [batching.share(examples, r, 2) for r in range(2)]
    assert parts[0] + parts[1] == examples and [len(p) for p in parts] == [5, 4]
    assert batching.share(examples[:1], 1, 2) == []
    assert batching.unlabelled(examples[3])["labels"] == [batching.IGNORE_INDEX]


def test_resume_at_another_world_size_keeps_the_global_micro_batch(tiny_model_dir, data17):
    from lorakit.train import rundir
    two = rundir.run_record(load_run(None, overrides=_overrides(tiny_model_dir, data17, "train.batch_size=4")), 2)
    one = rundir.run_record(load_run(None, overrides=_overrides(tiny_model_dir, data17, "train.batch_size=8")), 1)
    assert two["train.global_micro_batch"] == one["train.global_micro_batch"] == 8
    assert rundir.resume_changes(two, one, "ckpt") == ["train.batch_size: 4 -> 8", "world_size: 2 -> 1"]
    same_per_process = rundir.run_record(load_run(None, overrides=_overrides(tiny_model_dir, data17,
                                                                             "train.batch_size=4")), 1)
    with pytest.raises(LorakitError, match="train.global_micro_batch: 8 in the checkpoint, 4 now"):
        rundir.resume_changes(two, same_per_process, "ckpt")
    old = {k: v for k, v in one.items() if k not in ("world_size", "train.global_micro_batch")}
    assert rundir.resume_changes(old, one, "ckpt") == []  # a record from before: one process


def test_fsdp_with_a_quantized_base_is_a_clear_error():
    with pytest.raises(LorakitError, match="train.distributed=fsdp cannot shard a quantized base.*ddp"):
        load_run(None, overrides=["data.train=x.jsonl", "lora.quantize=nf4", "train.distributed=fsdp"])


@slow
def test_two_processes_give_one_process_adapter(tiny_model_dir, data17, tmp_path):
    """batch_size 4 on 2 processes == batch_size 8 on 1, for ddp and fsdp, flat and packed, and with
    gradient checkpointing (non-reentrant: no parameter marked ready twice); 5 steps cross an epoch."""
    common = ["train.max_steps=5", "train.batch_size=4", "train.grad_accum=2"]
    cases = {"ddp-flat": ["train.distributed=ddp"], "ddp-packed": ["train.distributed=ddp", "data.pack=true"],
             "fsdp-flat": ["train.distributed=fsdp"], "fsdp-packed": ["train.distributed=fsdp", "data.pack=true"],
             "ddp-checkpointing": ["train.distributed=ddp", "train.gradient_checkpointing=true"],
             "fsdp-checkpointing": ["train.distributed=fsdp", "train.gradient_checkpointing=true"]}
    runs = [[str(tmp_path / name), False, *_overrides(tiny_model_dir, data17, *common, *extra)]
            for name, extra in cases.items()]
    started = time.time()
    done = _worker(tmp_path, runs)
    assert done.returncode == 0, done.stderr[-3000:]
    for pack in ("false", "true"):
        ref = tmp_path / f"one-{pack}"
        train(load_run(None, overrides=_overrides(tiny_model_dir, data17, "train.max_steps=5", "train.batch_size=8",
                                                  "train.grad_accum=2", f"data.pack={pack}", f"output_dir={ref}")),
              progress=False)
        for name in cases:
            if ("packed" in name) == (pack == "true"):
                assert _max_diff(ref, tmp_path / name) <= 1e-5, name
    moved = load_file(tmp_path / "one-false/adapter_model.safetensors")
    assert max(float(v.abs().max()) for k, v in moved.items() if "lora_B" in k) > 1e-2  # it trained
    rows = [json.loads(x) for x in (tmp_path / "ddp-flat/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]  # rank 0 alone wrote the log
    print(f"{len(cases)} two-process runs in {time.time() - started:.0f} s")


@slow
def test_checkpoint_from_two_processes_resumes_in_one_and_in_two(tiny_model_dir, data17, tmp_path):
    """`torchrun -m lorakit train` (fsdp) stops at step 3; resumed to step 6 in 1 process (batch_size 8)
    and in 2 (batch_size 4) it gives the uninterrupted one-process adapter; eval runs on every rank."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({"model": str(tiny_model_dir), "data": {"train": str(data17), "eval": str(data17),
                                                                    "max_length": 64},
                               "lora": {"r": 4}, "train": {"learning_rate": 1e-2, "warmup_steps": 1,
                                                           "schedule": "constant", "batch_size": 4,
                                                           "distributed": "fsdp"}}))
    done = _launch(["-m", "lorakit", "train", str(cfg), "--set", "train.max_steps=3",
                    "--set", f"output_dir={tmp_path / 'cut'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 8 = batch_size 4 x grad_accum 1 x 2 process(es)" in done.stdout
    assert (tmp_path / "cut/checkpoints/step-000003/optimizer.pt").exists()
    import shutil
    shutil.copytree(tmp_path / "cut", tmp_path / "cut2")
    overrides = _overrides(tiny_model_dir, data17, "train.max_steps=6", f"data.eval={data17}")
    straight = train(load_run(None, overrides=[*overrides, "train.batch_size=8", f"output_dir={tmp_path / 'one'}"]),
                     progress=False)
    resumed = train(load_run(None, overrides=[*overrides, "train.batch_size=8", "train.distributed=fsdp",
                                              f"output_dir={tmp_path / 'cut'}"]), resume=True, progress=False)
    assert resumed.steps == straight.steps == 6
    assert _max_diff(tmp_path / "one", tmp_path / "cut") <= 1e-5
    again = _worker(tmp_path, [[str(tmp_path / "cut2"), True, *overrides, "train.batch_size=4",
                                "train.distributed=fsdp"]])
    assert again.returncode == 0, again.stderr[-3000:]
    assert _max_diff(tmp_path / "one", tmp_path / "cut2") <= 1e-5
    evals = [json.loads(x) for x in (tmp_path / "cut2/metrics.jsonl").read_text().splitlines()]
    two = [r["eval_loss"] for r in evals if "eval_loss" in r][-1]
    assert two == pytest.approx(straight.eval_loss, rel=1e-5)  # every rank's share, the sums reduced


@slow
def test_a_rank_that_raises_ends_the_run_naming_it(tiny_model_dir, data17, tmp_path):
    started = time.time()
    done = _worker(tmp_path, [[str(tmp_path / "run"), False, *_overrides(tiny_model_dir, data17, "train.max_steps=8",
                                                                         "train.batch_size=2")]],
                   timeout=120, env={"FAULT": "1"})
    seconds = time.time() - started
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "rank      : 1" in out or "rank: 1" in out, out[-3000:]
    assert "injected fault in the third forward" in out, out[-3000:]
    assert seconds < 60, seconds
