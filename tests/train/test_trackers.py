"""Experiment trackers (train/trackers.py): a run's metrics and config read back from each tracker's own files."""

import sys

import pytest

from lorakit import LorakitError
from lorakit.train import train
from lorakit.train.logbook import read_metrics

from conftest import run_config

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def tracked_run(tiny_model_dir, data_file, tmp_path_factory, ):
    out = tmp_path_factory.mktemp("tracked")
    cfg = run_config(tiny_model_dir, data_file, out, "train.max_steps=6", f"data.eval={data_file}",
                     "train.eval_every=3", "train.report_to=[tensorboard, mlflow]")
    mp = pytest.MonkeyPatch()
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        train(cfg, progress=False)
    finally:
        mp.undo()
    return out


def test_tensorboard_events_hold_the_metrics_and_config(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2
    acc = EventAccumulator(str(tracked_run / "tensorboard"))
    acc.Reload()
    rows = [r for r in read_metrics(tracked_run / "metrics.jsonl") if "loss" in r]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [round(e.value, 4) for e in acc.Scalars("train/loss")] == [round(r["loss"], 4) for r in rows]
    for tag in ("train/learning_rate", "train/grad_norm", "train/tokens_per_s"):
        assert len(acc.Scalars(tag)) == 6, tag
    evals = [r for r in read_metrics(tracked_run / "metrics.jsonl") if "eval_loss" in r]
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("eval/loss")] == \
        [(r["step"], round(r["eval_loss"], 4)) for r in evals]
    content = acc.PluginTagToContent("hparams")
    start = next(plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info for c in content.values()
                 if plugin_data_pb2.HParamsPluginData.FromString(c).HasField("session_start_info"))
    assert start.hparams["lora.r"].number_value == 4
    assert start.hparams["train.report_to"].string_value == "['tensorboard', 'mlflow']"


def test_mlflow_file_store_holds_the_metrics_and_config(tracked_run):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=(tracked_run / "mlruns").resolve().as_uri())
    [run] = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert run.data.params["lora.r"] == "4" and run.data.params["train.learning_rate"] == "0.01"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    rows = [r for r in read_metrics(tracked_run / "metrics.jsonl") if "loss" in r]
    assert [(m.step, round(m.value, 4)) for m in history] == [(r["step"], round(r["loss"], 4)) for r in rows]
    assert len(client.get_metric_history(run.info.run_id, "eval_loss")) == 2  # steps 3 and 6
    assert {"train_learning_rate", "train_grad_norm", "train_tokens_per_s"} <= set(run.data.metrics)
    assert run.info.status == "FINISHED"


def test_unknown_tracker_and_missing_package_are_clear(tiny_model_dir, data_file, tmp_path, monkeypatch):
    with pytest.raises(LorakitError, match="unknown tracker.*'tensorbord'"):
        run_config(tiny_model_dir, data_file, tmp_path, "train.report_to=[tensorbord]")
    for name in ("mlflow", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    cfg = run_config(tiny_model_dir, data_file, tmp_path, "train.max_steps=1", "train.report_to=[mlflow]")
    with pytest.raises(LorakitError, match=r"pip install 'lorakit\[mlflow\]'"):
        train(cfg, progress=False)


def _wandb_protos(run_file):
    """The protobuf records of a wandb run file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    records (crc32 4 bytes, length 2, type 1: full / first / middle / last) carry wandb's Record messages."""
    import struct
    data, out, pending, pos = run_file.read_bytes(), [], b"", 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if (pos % 32768) + 7 > 32768:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            out.append(pending)
    return out


def _wandb_records(run_file):
    """The history rows and config of an offline wandb run file, parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2
    history, config = [], {}
    for data in _wandb_protos(run_file):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
        elif record.WhichOneof("record_type") in ("config", "run"):  # a run record holds the initial config
            update = record.config.update if record.HasField("config") else record.run.config.update
            config.update({item.key: item.value_json for item in update})
    return history, config


def test_wandb_runs_offline_and_logs(tiny_model_dir, data_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import json
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login: offline
    cfg = run_config(tiny_model_dir, data_file, tmp_path / "run", "train.max_steps=3", "train.report_to=[wandb]")
    train(cfg, progress=False)
    [run_file] = (tmp_path / "run/wandb").glob("offline-run-*/run-*.wandb")
    history, config = _wandb_records(run_file)
    losses = [json.loads(h["train/loss"]) for h in history if "train/loss" in h]
    rows = [r["loss"] for r in read_metrics(tmp_path / "run/metrics.jsonl") if "loss" in r]
    assert [round(x, 4) for x in losses] == [round(x, 4) for x in rows]
    value = json.loads(config["lora.r"])
    assert (value["value"] if isinstance(value, dict) else value) == 4
