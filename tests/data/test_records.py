"""Record formats beside those in test_data.py: ShareGPT conversations (data/records.py)."""

import json

import pytest

from lorakit import LorakitError
from lorakit.data import as_messages, check_record, load_records
from lorakit.data.encode import encode

SHAREGPT = {"conversations": [{"from": "system", "value": "Be loud."}, {"from": "human", "value": "Shout cat"},
                              {"from": "gpt", "value": "CAT!"}]}
MESSAGES = {"messages": [{"role": "system", "content": "Be loud."}, {"role": "user", "content": "Shout cat"},
                         {"role": "assistant", "content": "CAT!"}]}


def test_sharegpt_reads_as_the_same_conversation(smol_tokenizer, tmp_path):
    assert check_record(SHAREGPT) == ("sharegpt", None)
    assert as_messages(SHAREGPT) == MESSAGES["messages"]
    a, b = (encode(r, smol_tokenizer, max_length=64) for r in (SHAREGPT, MESSAGES))
    assert a == b  # same tokens, same labels (loss on the gpt turn only)
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(SHAREGPT) + "\n")
    assert load_records(path)[0] == SHAREGPT


@pytest.mark.parametrize("turns, problem", [
    ([{"from": "robot", "value": "hi"}], "conversations[0].from' is 'robot'"),
    ([{"from": "human", "value": 3}], "conversations[0].value' must be a string"),
    ([{"from": "human", "value": "hi"}], "conversations' has no 'assistant' turn"),
    ([], "non-empty list"),
])
def test_bad_sharegpt_records_name_the_field(turns, problem, tmp_path):
    assert problem in check_record({"conversations": turns})[1]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"conversations": turns}) + "\n")
    with pytest.raises(LorakitError, match="bad.jsonl:1"):
        load_records(path)


def test_datasets_folder_and_arrow_file_read_like_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": f"Shout {w}", "completion": w.upper() + "!"} for w in ("cat", "dog", "sun")]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(tmp_path / "splits")
    assert list(load_records(tmp_path / "saved")) == rows
    assert list(load_records(tmp_path / "splits")) == rows  # a DatasetDict: its train split
    [arrow] = (tmp_path / "saved").glob("*.arrow")
    assert list(load_records(arrow)) == rows
    bad = datasets.Dataset.from_list([{"prompt": "a", "completion": 3}])
    bad.save_to_disk(tmp_path / "bad")
    with pytest.raises(LorakitError, match="row 1.*'completion' must be a string"):
        load_records(tmp_path / "bad")
    (tmp_path / "plain").mkdir()
    with pytest.raises(LorakitError, match="not one written by datasets' save_to_disk"):
        load_records(tmp_path / "plain")


def test_a_saved_sharegpt_dataset_trains(tiny_model_dir, tmp_path):
    datasets = pytest.importorskip("datasets")
    from lorakit.train import train
    from conftest import run_config
    datasets.Dataset.from_list([SHAREGPT] * 8).save_to_disk(tmp_path / "chat")
    result = train(run_config(tiny_model_dir, tmp_path / "chat", tmp_path / "run", "train.max_steps=2"),
                   progress=False)
    assert result.steps == 2 and result.tokens > 0
    assert (tmp_path / "run/adapter_model.safetensors").is_file()
