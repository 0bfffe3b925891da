"""The page on loopback for the ui tests: real runs trained by lorakit, the page alone or on a real server.

Fixtures (import them): trained_runs (two short runs of the tiny model, with eval rows and adapters),
page_alone (the page without a model), page_served (lorakit serve over the tiny model with the page at /
and API key "secret").
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serve"))
from serving import Running, adapters_dir  # noqa: E402,F401  (a fixture)

from conftest import run_config  # noqa: E402


def train_run(model_dir, data_file, out, lr):
    from lorakit.train import train
    cfg = run_config(model_dir, data_file, out, "train.max_steps=6", f"data.eval={data_file}",
                     "train.eval_every=3", f"train.learning_rate={lr}", "train.log_every=1")
    return train(cfg, progress=False)


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory, tiny_model_dir, data_file):
    root = tmp_path_factory.mktemp("runs")
    train_run(tiny_model_dir, data_file, root / "fast", 1e-2)
    train_run(tiny_model_dir, data_file, root / "sweep" / "slow", 1e-3)
    return root


def start_page(runs=None, adapters=None, api_key=None):
    from lorakit.ui.app import page_for, standalone
    return Running(standalone(page_for(runs, adapters, api_key=api_key)), None)


def start_served(model_dir, adapters, runs=None, api_key="secret"):
    from lorakit.models.load import load_model
    from lorakit.serve.server import build
    from lorakit.ui.api import mount
    from lorakit.ui.app import page_for
    model, tok = load_model(str(model_dir))
    app, engine = build(model, tok, "tiny", adapters, api_key=api_key, max_model_len=128)
    mount(app, page_for(runs, adapters, "tiny", api_key))
    return Running(app, engine)


@pytest.fixture(scope="module")
def page_alone(trained_runs, adapters_dir):
    s = start_page(trained_runs, adapters_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def page_served(tiny_model_dir, adapters_dir, trained_runs):
    s = start_served(tiny_model_dir, adapters_dir, trained_runs)
    yield s
    s.stop()
