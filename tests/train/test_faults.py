"""Fault injection: kills at random moments, SIGTERM then SIGKILL, a full disk, torn and half-written files.

What must hold after every fault: checkpoints/latest names a complete checkpoint (or resume falls back to
the newest complete one), --resume continues, temporary folders of killed saves go away, the metrics
log stays readable, and a full disk is an error that names the disk and the space needed.
benchmarks/faults.py runs the long versions (68 kill -9, 20 SIGTERM+SIGKILL) for docs/reliability.md.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from lorakit import LorakitError
from lorakit.train import state, train
from conftest import run_config

CHILD = """
import sys, torch
torch.set_num_threads(1)
from lorakit.train import load_run, train
resume = sys.argv[1] == "resume"
train(load_run(None, overrides=sys.argv[2:]), resume=resume, progress=False)
"""


def _run(args, resume: bool = False) -> None:
    """A whole run in a child, with the killed runs' settings (one thread: the same float sums)."""
    subprocess.run([sys.executable, "-c", CHILD, "resume" if resume else "train", *args], check=True,
                   capture_output=True)


def _overrides(tiny_model_dir, data_file, out, *extra):
    return [f"model={tiny_model_dir}", f"data.train={data_file}", f"output_dir={out}", "train.batch_size=4",
            "train.learning_rate=1e-2", "lora.r=4", "train.warmup_steps=2", *extra]


def _rows(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _start(args, out, min_rows: int) -> subprocess.Popen:
    """Start a training child; return once it has logged `min_rows` steps."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, "train", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _rows(out / "metrics.jsonl") < min_rows:
        if child.poll() is not None or time.time() > deadline:
            child.kill()
            raise AssertionError(f"the training child ended early: {child.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    return child


@pytest.mark.slow
def test_sigterm_then_sigkill_always_leaves_latest_complete(tiny_model_dir, data_file, tmp_path):
    """What a scheduler or `docker stop` does: SIGTERM, then SIGKILL 2-17 ms later, mid-save. Checkpoints every
    step make the kill land inside a save most times."""
    rng = random.Random(0)
    for trial in range(5):
        out = tmp_path / f"t{trial}"
        child = _start(_overrides(tiny_model_dir, data_file, out, "train.max_steps=100000", "train.save_every=1"),
                       out, min_rows=rng.randint(2, 6))
        child.send_signal(signal.SIGTERM)
        time.sleep(rng.uniform(0.002, 0.017))
        child.kill()
        child.wait()
        pointer = (out / "checkpoints/latest").read_text().strip()
        assert state.is_complete(out / "checkpoints" / pointer), (trial, pointer)
    last = tmp_path / "t4"
    step = json.loads((state.latest_checkpoint(last) / "trainer_state.json").read_text())["step"]
    resumed = train(run_config(tiny_model_dir, data_file, last, f"train.max_steps={step + 2}", "train.save_every=1"),
                    resume=True, progress=False)
    assert resumed.stopped == "done" and resumed.steps == step + 2
    assert not list((last / "checkpoints").glob(".step-*"))  # what the kill left half-written is gone


@pytest.mark.slow
def test_kill_9_at_random_moments_resumes_bit_identically(tiny_model_dir, data_file, tmp_path):
    """SIGKILL at a random moment of a run with checkpoints every 2 steps; resuming reaches the adapter of the
    uninterrupted run exactly."""
    steps = ["train.max_steps=12", "train.save_every=2", "lora.dropout=0.1"]
    straight = tmp_path / "straight"
    _run(_overrides(tiny_model_dir, data_file, straight, *steps))
    cut = tmp_path / "cut"
    child = _start(_overrides(tiny_model_dir, data_file, cut, *steps), cut, min_rows=random.Random(1).randint(3, 9))
    child.kill()
    child.wait()
    assert state.latest_checkpoint(cut) is not None
    _run(_overrides(tiny_model_dir, data_file, cut, *steps), resume=True)
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(cut / "adapter_model.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_falls_back_when_latest_names_a_broken_checkpoint(tiny_model_dir, data_file, tmp_path, capsys):
    train(run_config(tiny_model_dir, data_file, tmp_path, "train.max_steps=6", "train.save_every=2",
                     "train.keep_checkpoints=3"), progress=False)
    (tmp_path / "checkpoints/step-000006/optimizer.pt").unlink()  # a disk error took a file of the latest
    resumed = train(run_config(tiny_model_dir, data_file, tmp_path, "train.max_steps=8", "train.save_every=2",
                               "train.keep_checkpoints=3"), resume=True)
    assert "newest complete one, step-000004" in capsys.readouterr().out
    assert resumed.steps == 8 and (tmp_path / "checkpoints/latest").read_text().strip() == "step-000008"


def test_leftover_temporary_folders_are_removed_at_the_next_save(tiny_model_dir, data_file, tmp_path):
    leftover = tmp_path / "checkpoints/.step-000002.abc123"
    leftover.mkdir(parents=True)
    (leftover / "optimizer.pt").write_bytes(b"half")
    train(run_config(tiny_model_dir, data_file, tmp_path, "train.max_steps=2"), progress=False)
    assert not leftover.exists() and state.is_complete(tmp_path / "checkpoints/step-000002")


def test_a_kill_during_the_metrics_rewrite_leaves_the_old_log(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """On resume the log is rewritten without the rows after the checkpoint; a kill half-way through the
    rewrite (here: the write raising after half the text) must leave the old log, and a torn last row
    (a kill mid-append) must not break the resume."""
    cfg = ["train.max_steps=6", "train.save_every=3"]
    train(run_config(tiny_model_dir, data_file, tmp_path, *cfg), progress=False)
    log = tmp_path / "metrics.jsonl"
    with log.open("a") as f:
        f.write('{"step": 7, "loss": 1.2')  # torn by a kill mid-append
    before = log.read_text()
    from lorakit import atomic

    def half_then_die(path, text):
        def write(tmp):
            with open(tmp, "w") as f:
                f.write(text[: len(text) // 2])
            raise KeyboardInterrupt  # the kill
        atomic.atomic_write(path, write)
    monkeypatch.setattr("lorakit.train.logbook.atomic_write_text", half_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(tiny_model_dir, data_file, tmp_path, "train.max_steps=8", "train.save_every=3"),
              resume=True, progress=False)
    assert log.read_text() == before and not list(tmp_path.glob(".metrics.jsonl.*"))
    monkeypatch.undo()
    train(run_config(tiny_model_dir, data_file, tmp_path, "train.max_steps=8", "train.save_every=3"), resume=True,
          progress=False)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, 9))


def _mount_tmpfs(path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_full_disk_names_the_disk_and_the_space_needed(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """On a real full disk (a 16 KiB tmpfs) where the machine allows mounting one; always, through torch.save
    failing as it does on a full disk ("unexpected pos")."""
    disk = tmp_path / "disk"
    if _mount_tmpfs(disk, "16k"):
        try:
            with pytest.raises(LorakitError, match=r"the disk holding .* is full \(.* MiB free.*needs about"):
                train(run_config(tiny_model_dir, data_file, disk / "run", "train.max_steps=4", "train.save_every=1"),
                      progress=False)
            assert not list((disk / "run/checkpoints").glob(".step-*"))
        finally:
            subprocess.run(["umount", str(disk)], check=True)
    real = torch.save

    def full(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "patched"
    with pytest.raises(LorakitError, match=r"the disk holding .*checkpoints is full.*needs about"):
        train(run_config(tiny_model_dir, data_file, out, "train.max_steps=4", "train.save_every=2"), progress=False)
    assert not list((out / "checkpoints").glob(".step-*")) and not (out / "checkpoints/latest").exists()


def test_a_non_finite_adapter_is_never_saved_as_a_checkpoint(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """The guard in the loop stops a NaN step; if weights still went bad (a user's optimizer, a hook), the
    checkpoint writer refuses them and the previous checkpoint stays the latest."""
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def poisoning_step(self, *a, **k):
        out = real_step(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoning_step)
    with pytest.raises(LorakitError, match="not saving step 3: adapter tensors hold NaN"):
        train(run_config(tiny_model_dir, data_file, tmp_path, "train.max_steps=6", "train.save_every=1"),
              progress=False)
    assert (tmp_path / "checkpoints/latest").read_text().strip() == "step-000002"
