"""Experiment trackers (train.report_to): TensorBoard, MLflow, Weights & Biases, each a loop.Hook.

    open_trackers(names, out, cfg_record, log_every)   the trackers a run asked for, started, or a
                                                       LorakitError naming the pip extra that is missing
    Tracker.after_step     loss, learning rate, grad norm, tokens/s every log_every steps (and the last)
    Tracker.record         any other metrics at a step (the evaluations: eval_loss, eval_perplexity)
    Tracker.close          flush and end the run

Where each writes: TensorBoard event files under output_dir/tensorboard; MLflow a run in the
experiment "lorakit" of MLFLOW_TRACKING_URI, or of a local file store output_dir/mlruns when that is
unset; wandb a run under output_dir/wandb, offline unless the user logged in (WANDB_API_KEY or
`wandb login`) or set WANDB_MODE. The resolved run config goes to each as hyper-parameters.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LorakitError
from .loop import Hook, Step
from .state import TrainState

TRACKERS = ("tensorboard", "mlflow", "wandb")


def _need(module: str, extra: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LorakitError(f"train.report_to: {extra} needs the {module.split('.')[0]} package: "
                           f"pip install 'lorakit[{extra}]'") from None


def _scalar(value):
    """A hyper-parameter value trackers accept: numbers, strings and booleans as they are, others as text."""
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class Tracker(Hook):
    """Base: subclasses implement write(step, metrics) and close()."""

    def __init__(self, log_every: int = 1, total_steps: int = 0):
        self.every, self.total = log_every, total_steps

    def after_step(self, state: TrainState, step: Step) -> None:
        if step.step % self.every == 0 or step.step == self.total:
            self.record(step.step, {"train/loss": step.loss, "train/learning_rate": step.lr,
                                    "train/grad_norm": step.grad_norm,
                                    "train/tokens_per_s": step.tokens / max(step.seconds, 1e-9)})

    def record(self, step: int, metrics: dict) -> None:
        self.write(step, {k: float(v) for k, v in metrics.items() if v is not None})

    def write(self, step: int, metrics: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush and end the run."""


class TensorBoardTracker(Tracker):
    def __init__(self, out: Path, config: dict, **kw):
        super().__init__(**kw)
        _need("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(Path(out) / "tensorboard"))
        self.writer.add_hparams({k: _scalar(v) for k, v in config.items()}, {}, run_name=".")

    def write(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    def __init__(self, out: Path, config: dict, run_name: str = "lorakit", **kw):
        super().__init__(**kw)
        tracking = _need("mlflow.tracking", "mlflow")
        from mlflow.entities import Param
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # MLflow 3 asks for this opt-in to its file store (kept by MLflow, in maintenance mode)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(out) / "mlruns").resolve().as_uri()
        self.client = tracking.MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("lorakit")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("lorakit")
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, str(_scalar(v))[:6000]) for k, v in config.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def write(self, step: int, metrics: dict) -> None:
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k.replace("/", "_"), v, now, step)
                                                    for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandbTracker(Tracker):
    def __init__(self, out: Path, config: dict, run_name: str = "lorakit", **kw):
        super().__init__(**kw)
        wandb = _need("wandb", "wandb")
        logged_in = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file() and \
            "api.wandb.ai" in (Path.home() / ".netrc").read_text(errors="replace")
        mode = os.environ.get("WANDB_MODE") or ("online" if logged_in else "offline")
        (Path(out) / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project="lorakit", name=run_name, dir=str(out), mode=mode,
                              config={k: _scalar(v) for k, v in config.items()})

    def write(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def open_trackers(names, out: Path, config: dict, run_name: str, log_every: int = 1,
                  total_steps: int = 0) -> list[Tracker]:
    """Start the trackers `names` asks for (any of TRACKERS); on a failure the ones started are closed."""
    started = []
    try:
        for name in names:
            kw = dict(log_every=log_every, total_steps=total_steps)
            if name != "tensorboard":
                kw["run_name"] = run_name
            started.append(_CLASSES[name](Path(out), config, **kw))
    except BaseException:
        for tracker in started:
            tracker.close()
        raise
    return started
