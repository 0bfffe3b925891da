"""Parity with Hugging Face PEFT (the reference): numbers, files, and the trainable-parameter line."""

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import MODELS, logits, tiny_gpt2, tiny_llama

warnings.filterwarnings("ignore")

CASES = [
    ("llama", dict(target_modules=["q_proj", "v_proj", "down_proj"])),
    ("llama", dict(target_modules=["q_proj", "v_proj"], use_rslora=True, r=16, lora_alpha=8)),
    ("llama", dict(target_modules=["q_proj", "k_proj", "o_proj"], use_dora=True)),
    ("llama", dict(target_modules="all-linear", rank_pattern={"v_proj": 2, "mlp.down_proj": 6},
                   alpha_pattern={"q_proj": 3})),
    ("llama", dict(target_modules=r".*\.(q|v)_proj")),
    ("llama", dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1], layers_pattern="layers")),
    ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("gpt2", dict(target_modules=["c_attn", "c_proj"], bias="all")),
    ("gpt2", dict(target_modules=["c_attn"], bias="lora_only", use_dora=True)),
    ("gpt2", dict(target_modules=["c_attn", "wte"], exclude_modules=["c_proj"])),
    ("bert", dict(target_modules=["query", "value"], modules_to_save=["classifier"], task_type="SEQ_CLS")),
]
IDS = [f"{k}-{i}" for i, (k, _) in enumerate(CASES)]


def _pair(kind, kw, seed=1):
    full = dict(r=4, lora_alpha=8, init_lora_weights=False)
    full.update(copy.deepcopy(kw))  # PEFT mutates lists it is given
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(MODELS[kind](), peft.LoraConfig(**full))
    torch.manual_seed(seed)
    ours = lorakit.get_peft_model(MODELS[kind](), lorakit.LoraConfig(**full))
    return theirs.eval(), ours.eval()


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_same_seed_same_weights_same_logits(kind, kw, ids):
    theirs, ours = _pair(kind, kw)
    t = {k: v for k, v in theirs.state_dict().items()}
    o = {k.replace(".lora_A.default", ".lora_A.default.weight").replace(".lora_B.default", ".lora_B.default.weight")
         .replace(".lora_magnitude_vector.default", ".lora_magnitude_vector.default.weight"): v
         for k, v in ours.state_dict().items()}
    emb = {k.replace("lora_A.default.weight", "lora_embedding_A.default").replace(
        "lora_B.default.weight", "lora_embedding_B.default"): v for k, v in o.items()}
    for k, v in t.items():
        mine = o.get(k, emb.get(k))
        assert mine is not None, k
        assert torch.allclose(mine, v, atol=1e-6, rtol=0), k
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_trainable_line_matches(kind, kw, capsys):
    theirs, ours = _pair(kind, kw)
    theirs.print_trainable_parameters()
    ours.print_trainable_parameters()
    line_theirs, line_ours = capsys.readouterr().out.strip().splitlines()
    assert line_ours == line_theirs


@pytest.mark.parametrize("kind,kw", CASES, ids=IDS)
def test_files_match_and_cross_load(kind, kw, ids, tmp_path):
    theirs, ours = _pair(kind, kw)
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "ours")
    t_sd, o_sd = load_file(tmp_path / "peft/adapter_model.safetensors"), load_file(tmp_path / "ours/adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in o_sd.items()} == {k: tuple(v.shape) for k, v in t_sd.items()}
    for k in t_sd:
        assert torch.allclose(o_sd[k], t_sd[k], atol=1e-6), k
    t_cfg = json.loads((tmp_path / "peft/adapter_config.json").read_text())
    o_cfg = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    for cfg in (t_cfg, o_cfg):
        cfg.pop("peft_version", None)
        if isinstance(cfg["target_modules"], list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
    assert o_cfg == t_cfg
    # lorakit file -> PEFT, PEFT file -> lorakit: same logits as the model that saved it
    loaded_in_peft = peft.PeftModel.from_pretrained(MODELS[kind](seed=7), tmp_path / "ours").eval()
    loaded_in_ours = lorakit.PeftModel.from_pretrained(MODELS[kind](seed=7), tmp_path / "peft").eval()
    if kw.get("bias") is None and not any("embed" in str(t) or "wte" in str(t) for t in kw["target_modules"]):
        # a different base (seed 7) carries the same adapter: compare against each other
        assert torch.allclose(logits(loaded_in_peft, ids), logits(loaded_in_ours, ids), atol=1e-5, rtol=0)
    same_base_peft = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "ours").eval()
    same_base_ours = lorakit.PeftModel.from_pretrained(MODELS[kind](), tmp_path / "peft").eval()
    reference = logits(ours, ids)
    assert torch.allclose(logits(same_base_peft, ids), reference, atol=1e-5, rtol=0)
    assert torch.allclose(logits(same_base_ours, ids), reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", [True, "gaussian", "pissa"])
def test_initialisations_match_peft(init, ids):
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=init)).eval()
    torch.manual_seed(3)
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=init)).eval()
    t = [v for k, v in theirs.named_parameters() if "lora_" in k]
    o = [v for k, v in ours.named_parameters() if "lora_" in k]
    assert len(t) == len(o)
    for a, b in zip(t, o):
        assert torch.allclose(a, b, atol=1e-5), init
    assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=1e-5)


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"lora_dropout": 0.1, "use_dora": True}])
def test_training_trajectory_matches_peft(variant, ids):
    """Same seed, same data, same optimizer: the losses agree step by step (dropout RNG included)."""
    losses = {}
    for lib in (peft, lorakit):
        torch.manual_seed(5)
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=4, target_modules="all-linear", **variant))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model.train()
        torch.manual_seed(6)
        run = []
        for _ in range(5):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses[lib.__name__] = run
    assert losses["lorakit"] == pytest.approx(losses["peft"], rel=1e-5)


def test_seed_code_runs_with_only_the_import_changed(tmp_path, ids):
    """The issue's seed snippet, verbatim but for the import."""
    from lorakit import LoraConfig, PeftModel, get_peft_model
    model = tiny_llama()
    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    base_model = tiny_llama()
    model = PeftModel.from_pretrained(base_model, tmp_path / "adapter")
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(logits(plain, ids), logits(model.eval(), ids), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("variant", [{}, {"use_dora": True}])
def test_half_precision_base_matches_peft(dtype, variant, ids):
    """On a bf16/fp16 base, adapters live in fp32 as with PEFT's autocast_adapter_dtype=True."""
    kw = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, **variant)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(tiny_llama().to(dtype), peft.LoraConfig(**kw)).eval()
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(tiny_llama().to(dtype), lorakit.LoraConfig(**kw)).eval()
    t = {k: v for k, v in theirs.named_parameters() if "lora_" in k}
    o = {k: v for k, v in ours.named_parameters() if "lora_" in k}
    assert {v.dtype for v in o.values()} == {v.dtype for v in t.values()} == {torch.float32}
    if variant:  # DoRA's per-row norm: we sum it in a different order (fp32), so allow one half-precision step
        assert torch.allclose(logits(ours, ids), logits(theirs, ids), atol=4e-3, rtol=0)
    else:
        assert torch.equal(logits(ours, ids), logits(theirs, ids))
