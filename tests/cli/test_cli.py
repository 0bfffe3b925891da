"""Every CLI command end to end on a tiny model, through the real entry point."""

import json
import subprocess
import sys

import pytest
import torch

from lorakit.cli import main


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One small training run through `lorakit train` (shared by the other commands' tests)."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Shout {w}", "completion": w.upper()}) + "\n"
                            for w in ["cat", "dog", "sun", "sky"] * 2))
    config = root / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata:\n  train: {data}\nlora:\n  r: 4\n"
                      f"train:\n  max_steps: 3\n  batch_size: 4\noutput_dir: {root / 'out'}\n")
    assert main(["train", str(config), "--quiet", "--set", "train.learning_rate=1e-2"]) == 0
    return {"root": root, "data": data, "adapter": root / "out", "model": tiny_model_dir}


def test_train_wrote_a_peft_adapter(trained):
    assert (trained["adapter"] / "adapter_model.safetensors").exists()
    assert (trained["adapter"] / "run.yaml").read_text().count("learning_rate: 0.01") == 1


@pytest.mark.parametrize("metric,key", [("exact_match", "exact_match"), ("perplexity", "perplexity"), ("kl", "kl")])
def test_eval_json_last_line(trained, metric, key, capsys):
    rc = main(["eval", "--model", str(trained["model"]), "--adapter", str(trained["adapter"]),
               "--data", str(trained["data"]), "--metric", metric, "--json"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert key in result and result["n" if metric == "exact_match" else "tokens"] > 0
    if metric == "kl":
        assert result["kl"] >= 0


def test_generate_with_prompt(trained, capsys):
    assert main(["generate", "--model", str(trained["model"]), "--adapter", str(trained["adapter"]),
                 "--prompt", "Shout cat", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_merge_writes_a_plain_transformers_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM
    import lorakit
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(trained["model"]), "--adapter", str(trained["adapter"]), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(trained["model"]).eval(), trained["adapter"])
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)
    assert (out / "tokenizer_config.json").exists()


def test_inspect_prints_layers_and_writes_png(trained, capsys):
    assert main(["inspect", str(trained["adapter"])]) == 0
    out = capsys.readouterr().out
    assert "q_proj" in out and "eff.rank" in out
    assert (trained["adapter"] / "inspect.png").exists()
    assert main(["inspect", str(trained["adapter"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(m["r"] == 4 and m["effective_rank"] <= 4.0 + 1e-6 for m in report["modules"])


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model: x\nlora:\n  rank: 4\n")
    assert main(["train", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "lorakit: error:" in err and "did you mean 'lora.r'" in err and "Traceback" not in err
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "eval", "generate", "merge", "inspect", "combine", "demo"])
def test_every_help_is_complete(command):
    out = subprocess.run([sys.executable, "-m", "lorakit.cli", command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: lorakit " + command in out.stdout
    assert all(line.strip() for line in out.stdout.splitlines()[:1])


def test_train_eval_and_merge_on_a_4bit_base(trained, tmp_path, capsys):
    """QLoRA from the command line: lora.quantize=nf4 trains; eval/merge take --quantize nf4."""
    pytest.importorskip("bitsandbytes")
    config = trained["root"] / "run.yaml"
    out = tmp_path / "qlora"
    assert main(["train", str(config), "--quiet", "--set", "lora.quantize=nf4", "--set", f"output_dir={out}"]) == 0
    assert (out / "adapter_model.safetensors").exists()
    assert main(["eval", "--model", str(trained["model"]), "--adapter", str(out), "--quantize", "nf4",
                 "--data", str(trained["data"]), "--metric", "perplexity", "--json"]) == 0
    assert "perplexity" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(trained["model"]), "--adapter", str(out), "--quantize", "nf4",
                 "--out", str(merged)]) == 0
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("4bit" in type(m).__name__ for m in plain.modules())


def test_combine_two_adapters_from_the_command_line(trained, tmp_path, capsys):
    """lorakit combine A B --weights 0.7 0.3 --method cat: the result equals 0.7·ΔW_A + 0.3·ΔW_B exactly."""
    from transformers import AutoModelForCausalLM
    import lorakit
    out = tmp_path / "combined"
    a = b = trained["adapter"]
    assert main(["combine", str(a), str(b), "--weights", "0.7", "0.3", "--method", "cat", "--out", str(out)]) == 0
    assert "combined adapter written" in capsys.readouterr().out
    combined = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(trained["model"]).eval(), out)
    single = lorakit.load_adapter(AutoModelForCausalLM.from_pretrained(trained["model"]).eval(), a)
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():  # 0.7·ΔW + 0.3·ΔW = ΔW
        assert torch.allclose(combined(ids).logits, single(ids).logits, atol=1e-5)
