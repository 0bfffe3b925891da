"""adapter_model.bin (save_pretrained(safe_serialization=False)): both ways with PEFT, read only as tensors."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import LorakitError
from lorakit.adapters.binfile import read_bin, write_bin

warnings.filterwarnings("ignore")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _config(module, **kw):
    return module.LoraConfig(r=2, target_modules=["lin0", "lin1"], init_lora_weights=False, **kw)


def _seeded(seed):
    """The base model, with the RNG then at `seed` (for the adapter's init)."""
    model = MLP()
    torch.manual_seed(seed)
    return model


class _Payload:
    """What a malicious pickle holds: unpickling it would call print (torch.load(weights_only=False) would)."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_bin_files_load_both_ways_with_peft(tmp_path):
    x = torch.randn(4, 6)
    theirs = peft.get_peft_model(_seeded(1), _config(peft, use_dora=True)).eval()
    ours = lorakit.get_peft_model(_seeded(2), _config(lorakit, use_dora=True)).eval()
    theirs.save_pretrained(tmp_path / "peft", safe_serialization=False)
    ours.save_pretrained(tmp_path / "ours", safe_serialization=False)
    for folder in ("peft", "ours"):
        assert sorted(p.name for p in (tmp_path / folder).iterdir()) == ["README.md", "adapter_config.json",
                                                                         "adapter_model.bin"]
    assert set(read_bin(tmp_path / "ours" / "adapter_model.bin")) == set(
        torch.load(tmp_path / "peft" / "adapter_model.bin", weights_only=True))  # PEFT's keys
    from_peft = lorakit.PeftModel.from_pretrained(MLP(), tmp_path / "peft").eval()
    from_ours = peft.PeftModel.from_pretrained(MLP(), tmp_path / "ours").eval()
    torch.testing.assert_close(from_peft(x), theirs(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(from_ours(x), ours(x), atol=1e-6, rtol=0)
    assert not torch.allclose(from_ours(x), from_peft(x))  # two different adapters, each loaded as itself


def test_safetensors_is_preferred_and_a_bin_save_replaces_it(tmp_path):
    first = lorakit.get_peft_model(_seeded(1), _config(lorakit))
    second = lorakit.get_peft_model(_seeded(2), _config(lorakit))
    x = torch.randn(3, 6)
    first.save_pretrained(tmp_path)
    write_bin(tmp_path / "adapter_model.bin", {"unused": torch.zeros(1)})
    torch.testing.assert_close(lorakit.PeftModel.from_pretrained(MLP(), tmp_path)(x), first(x))  # both: safetensors
    second.save_pretrained(tmp_path, safe_serialization=False)  # no stale safetensors is left to win over it
    assert not (tmp_path / "adapter_model.safetensors").exists()
    torch.testing.assert_close(lorakit.PeftModel.from_pretrained(MLP(), tmp_path)(x), second(x))
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # written through a temporary file


@pytest.mark.parametrize("content, match", [
    ({"base_model.model.lin0.lora_A.weight": torch.zeros(2, 6), "x": _Payload()}, "holds a pickled object"),
    ({"base_model.model.lin0.lora_A.weight": torch.zeros(2, 6), "note": "hello", "step": 3},
     r"2 value\(s\) that are not tensors"),
    ([torch.zeros(2)], "holds a list, not a dict of tensors"),
])
def test_a_bin_holding_anything_but_named_tensors_is_refused(tmp_path, capsys, content, match):
    model = lorakit.get_peft_model(MLP(), _config(lorakit))
    model.save_pretrained(tmp_path, safe_serialization=False)
    torch.save(content, tmp_path / "adapter_model.bin")
    with pytest.raises(LorakitError, match=match):
        lorakit.PeftModel.from_pretrained(MLP(), tmp_path)
    with pytest.raises(LorakitError, match=match):
        lorakit.read_adapter(tmp_path)
    assert "unpickled" not in capsys.readouterr().out  # the payload never ran


def test_garbage_bin_is_a_clear_error(tmp_path):
    lorakit.get_peft_model(MLP(), _config(lorakit)).save_pretrained(tmp_path, safe_serialization=False)
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not a torch file")
    with pytest.raises(LorakitError, match="not a readable torch.save file"):
        lorakit.PeftModel.from_pretrained(copy.deepcopy(MLP()), tmp_path)


def test_a_hub_adapter_with_only_a_bin_file_is_fetched_and_loads(tmp_path, monkeypatch):
    """from_pretrained with a Hub id asks for the .bin too (older PEFT adapters have only that)."""
    import fnmatch
    import shutil

    import huggingface_hub
    ours = lorakit.get_peft_model(_seeded(3), _config(lorakit)).eval()
    ours.save_pretrained(tmp_path / "repo", safe_serialization=False)

    def fake_download(repo_id, allow_patterns, revision=None):  # the Hub, as a folder: copies what matches
        for f in (tmp_path / "repo").iterdir():
            if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
                (tmp_path / "cache").mkdir(exist_ok=True)
                shutil.copy(f, tmp_path / "cache" / f.name)
        return str(tmp_path / "cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    x = torch.randn(2, 6)
    loaded = lorakit.PeftModel.from_pretrained(MLP(), "someone/an-old-adapter")
    torch.testing.assert_close(loaded(x), ours(x))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["adapter_config.json", "adapter_model.bin"]
