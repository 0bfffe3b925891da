"""The forgetting check: base vs adapter on the shipped general text, checked against independent paths."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.cli import main
from lorakit.data import prepare
from lorakit.eval import forgetting, general_text, loss_and_perplexity


def adapted(model_dir, nudge: float):
    """The tiny SmolLM2-vocabulary model with an r=4 adapter whose B is `nudge`-sized noise (0: untouched)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    torch.manual_seed(1)  # A's Kaiming init and B's noise: the same adapter on every call
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, nudge) if nudge else None
    return model


def test_the_general_text_ships_with_the_package():
    passages = general_text()
    assert len(passages) >= 40 and all(len(p["text"].split()) >= 25 for p in passages)


def test_an_untouched_adapter_has_forgotten_nothing(tiny_model_dir, smol_tokenizer):
    result = forgetting(adapted(tiny_model_dir, 0.0), smol_tokenizer, records=general_text()[:4], max_length=64)
    assert result["passages"] == 4 and result["tokens"] > 200
    assert result["kl"] == pytest.approx(0.0, abs=1e-7)
    assert result["perplexity_change"] == pytest.approx(0.0, abs=1e-6)


def test_a_changed_adapter_matches_the_merged_model_and_the_plain_base(tiny_model_dir, smol_tokenizer):
    model = adapted(tiny_model_dir, 0.5)
    records = general_text()[:4]
    result = forgetting(model, smol_tokenizer, records=records, max_length=64)
    data = prepare(records, smol_tokenizer, 64, train_on_prompt=True)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    merged = lorakit.merge_and_unload(adapted(tiny_model_dir, 0.5))
    assert result["base_perplexity"] == pytest.approx(loss_and_perplexity(plain, data)["perplexity"], rel=1e-5)
    assert result["adapter_perplexity"] == pytest.approx(loss_and_perplexity(merged, data)["perplexity"], rel=1e-4)
    # KL(adapter || base) from the two separate models, over every real token
    ids = smol_tokenizer([r["text"] for r in records[:1]], return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        la, lb = (torch.log_softmax(m(ids).logits, -1) for m in (merged, plain))
    assert result["kl"] > 1e-4 and result["perplexity_change"] != 0
    assert float((la.exp() * (la - lb)).sum(-1).mean()) > 0


def test_eval_forgetting_from_the_command_line(tiny_model_dir, tmp_path, capsys):
    model = adapted(tiny_model_dir, 0.3)
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"),
                 "--forgetting", "--limit", "3", "--max-length", "64", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("general text (3 passages")
    result = json.loads(out[-1])["forgetting"]
    assert result["kl"] > 0 and result["base_perplexity"] > 1


@pytest.mark.parametrize("argv,says", [
    (["--forgetting"], "give --adapter DIR"),
    ([], "nothing to evaluate"),
    (["--data", "x.jsonl"], "--metric"),
    (["--metric", "perplexity"], "needs --data"),
])
def test_eval_arguments_that_cannot_work_are_named(argv, says, tiny_model_dir, capsys):
    assert main(["eval", "--model", str(tiny_model_dir), *argv]) == 2
    assert says in capsys.readouterr().err
