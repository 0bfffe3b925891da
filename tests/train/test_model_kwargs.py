"""model_kwargs: a run on a base that accelerate offloads trains the same adapter as one in memory."""

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.train import train
from lorakit.train.recipe import build

from conftest import run_config


def test_an_offloaded_base_trains_the_same_adapter(tiny_model_dir, data_file, tmp_path):
    steps = ["train.max_steps=3", "train.flat_batches=false"]
    plain = train(run_config(tiny_model_dir, data_file, tmp_path / "plain", *steps), progress=False)
    # ~6.3 MB of embeddings (tied head) and two ~37 KB layers: 6.35 MB of CPU leaves a layer for the disk
    offload = ["model_kwargs.device_map=auto", "model_kwargs.max_memory={cpu: 6350000}",
               f"model_kwargs.offload_folder={tmp_path / 'offload'}"]
    cfg = run_config(tiny_model_dir, data_file, tmp_path / "moved", *steps, *offload)
    placed = build(cfg).model.hf_device_map
    assert "disk" in placed.values() and "cpu" in placed.values(), placed  # else the test proves nothing
    moved = train(cfg, progress=False)
    a, b = (load_file(r.output_dir / "adapter_model.safetensors") for r in (plain, moved))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("override,says", [
    ("model_kwargs.device_map=everywhere", "model_kwargs.device_map must be one of auto"),
    ("model_kwargs.max_memory={cpu: 1GiB}", "add model_kwargs.device_map: auto"),
    ("model_kwargs.max_memory=lots", "model_kwargs.max_memory must map devices to sizes"),
    ("model_kwargs.offload=yes", "model_kwargs.offload"),
])
def test_bad_placement_keys_are_named(override, says, tiny_model_dir, data_file, tmp_path):
    with pytest.raises(LorakitError, match=says):
        run_config(tiny_model_dir, data_file, tmp_path / "x", override)
