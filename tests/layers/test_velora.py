"""VeLoRA (velora_config): PEFT's init RNG, training gradients and projection updates, merges, files, refusals."""

import copy
import warnings

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit import LorakitError

warnings.filterwarnings("ignore")

INIT_TYPES = ["random", "batch_average", "batch_average_once"]


class MLP(nn.Module):
    """in_features 10 and 20: with num_groups=3 both need zero padding (g = 4 and 7)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin0, self.lin1, self.lin2 = nn.Linear(10, 20), nn.Linear(20, 20), nn.Linear(20, 2)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(torch.relu(self.lin0(x)))))


def _pair(init_type="random", num_groups=3, scale=1.0, make=MLP, **kw):
    """PEFT's and lorakit's model from the same seed; (theirs, ours, RNG draws after creation (theirs, ours))."""
    full = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["lin0", "lin1", "lin2"], **kw)
    vel = dict(num_groups=num_groups, scale=scale, init_type=init_type)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(make(), peft.LoraConfig(**copy.deepcopy(full), velora_config=peft.VeloraConfig(**vel)))
    after_theirs = torch.rand(3)
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(make(), lorakit.LoraConfig(**full, velora_config=lorakit.VeloraConfig(**vel)))
    after_ours = torch.rand(3)
    return theirs, ours, (after_theirs, after_ours)


def _ours(key: str) -> str:
    """PEFT's in-memory key -> lorakit's (lorakit keeps A and B as parameters, not nn.Linear modules)."""
    return key.replace(".default.weight", ".default") if (".lora_A." in key or ".lora_B." in key) else key


def _states_equal(theirs, ours, atol=0.0):
    ts, os_ = theirs.state_dict(), ours.state_dict()
    assert {_ours(k) for k in ts} == set(os_)
    for k, v in ts.items():
        assert v.dtype == os_[_ours(k)].dtype, k
        torch.testing.assert_close(os_[_ours(k)], v, atol=atol, rtol=0, msg=k)


def _train_steps(model, inputs, dropout_seed=7):
    """Forward + backward per input in train mode; the gradients of every adapter parameter, per step."""
    model.train()
    grads = []
    for i, x in enumerate(inputs):
        model.zero_grad()
        torch.manual_seed(dropout_seed + i)
        model(x).pow(2).sum().backward()
        grads.append({_ours(n): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return grads


@pytest.mark.parametrize("init_type", INIT_TYPES)
def test_creation_draws_the_rng_as_peft_and_gives_its_tensors(init_type):
    theirs, ours, (after_theirs, after_ours) = _pair(init_type)
    _states_equal(theirs, ours)
    assert torch.equal(after_theirs, after_ours)  # "random" draws one randn(g) per layer, after A and B
    embed = ours.base_model.model.lin0.lora_velora_embed["default"]
    assert embed.shape == (4,)  # ceil(10 / 3)
    if init_type == "random":
        assert torch.linalg.vector_norm(embed).item() == pytest.approx(1.0, abs=1e-6)
    else:
        assert not embed.any()  # zeros until the first training forward


@pytest.mark.parametrize("init_type", INIT_TYPES)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_training_gradients_and_projection_updates_match_peft(init_type, dropout):
    theirs, ours, _ = _pair(init_type, scale=1.5, lora_dropout=dropout)
    torch.manual_seed(3)
    inputs = [torch.randn(5, 10), torch.randn(2, 3, 10) * 2 + 1]
    g_theirs, g_ours = _train_steps(theirs, inputs), _train_steps(ours, inputs)
    for step_theirs, step_ours in zip(g_theirs, g_ours):
        assert set(step_theirs) == set(step_ours) and any(".lora_A." in k for k in step_ours)
        for k, v in step_theirs.items():
            torch.testing.assert_close(step_ours[k], v, atol=1e-5, rtol=1e-5, msg=k)
    _states_equal(theirs, ours, atol=1e-6)  # the projection vectors after the updates
    theirs.eval(), ours.eval()
    torch.testing.assert_close(ours(inputs[0]), theirs(inputs[0]), atol=1e-6, rtol=0)


def test_lora_bias_trains_with_velora_as_in_peft():
    theirs, ours, _ = _pair("batch_average", lora_bias=True)
    x = torch.randn(5, 10)
    g_theirs, g_ours = _train_steps(theirs, [x])[0], _train_steps(ours, [x])[0]
    bias = [k for k in g_theirs if ".lora_B." in k and k.endswith(".bias")]
    assert bias
    for k in bias:  # lorakit keeps B's bias in lora_bias; PEFT in lora_B (an nn.Linear)
        torch.testing.assert_close(g_ours[k.replace(".lora_B.default.bias", ".lora_bias.default")], g_theirs[k])
    for k in (k for k in g_theirs if k.endswith(".weight") or ".lora_A." in k):
        torch.testing.assert_close(g_ours[_ours(k)], g_theirs[k], atol=1e-5, rtol=1e-5)


def test_a_gradient_is_approximate_and_exact_with_one_feature_per_group():
    """The compression is real (A's gradient differs from plain LoRA's, B's and the input's do not), and with
    one feature per sub-token (num_groups = in_features, v = ±1) it is lossless: plain LoRA's gradients."""
    torch.manual_seed(3)
    x = torch.randn(6, 10)

    def grads(velora):
        torch.manual_seed(1)
        model = lorakit.get_peft_model(MLP(), lorakit.LoraConfig(r=4, init_lora_weights=False, target_modules=["lin0"],
                                                                 velora_config=velora))
        inp = x.clone().requires_grad_(True)
        model.train()
        model(inp).pow(2).sum().backward()
        layer = model.base_model.model.lin0
        return layer.lora_A["default"].grad, layer.lora_B["default"].grad, inp.grad

    plain = grads(None)
    coarse = grads(lorakit.VeloraConfig(num_groups=2, init_type="random"))
    assert not torch.allclose(coarse[0], plain[0], atol=1e-3)
    torch.testing.assert_close(coarse[1], plain[1]), torch.testing.assert_close(coarse[2], plain[2])
    for init_type in INIT_TYPES:
        exact = grads(lorakit.VeloraConfig(num_groups=10, init_type=init_type))
        for a, b in zip(exact, plain):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_projection_is_set_per_training_forward_as_the_init_type_says():
    x1, x2 = torch.randn(4, 10), torch.randn(4, 10) + 3
    for init_type, changes_on_second in (("batch_average", True), ("batch_average_once", False), ("random", False)):
        _, model, _ = _pair(init_type)
        embed = lambda: model.base_model.model.lin0.lora_velora_embed["default"].clone()  # noqa: E731
        start = embed()
        model.eval()
        model(x1)  # eval: never updates
        model.train()
        with torch.no_grad():
            model(x1)  # no grad: never updates
        assert torch.equal(embed(), start)
        model(x1).sum().backward()
        first = embed()
        assert torch.equal(first, start) == (init_type == "random")
        model(x2).sum().backward()
        assert (not torch.equal(embed(), first)) == changes_on_second


def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward():
    theirs, ours, _ = _pair("batch_average")
    x = torch.randn(5, 10)
    _train_steps(theirs, [x]), _train_steps(ours, [x])
    theirs.eval(), ours.eval()
    expected = ours(x)
    torch.testing.assert_close(expected, theirs(x), atol=1e-6, rtol=0)
    ours.merge_adapter(), theirs.merge_adapter()
    torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.base_model.model.lin1.weight, theirs.base_model.model.lin1.weight, atol=1e-6, rtol=0)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours.base_model.model.lin1.weight, MLP().lin1.weight, atol=1e-6, rtol=0)
    merged = ours.merge_and_unload()
    assert not any(isinstance(m, lorakit.LoraLayer) for m in merged.modules())
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("safe", [True, False])
def test_files_load_both_ways_with_peft(tmp_path, safe):
    theirs, ours, _ = _pair("batch_average_once")
    x = torch.randn(5, 10)
    _train_steps(theirs, [x]), _train_steps(ours, [x])  # sets the projection vectors
    theirs.eval(), ours.eval()
    theirs.save_pretrained(tmp_path / "peft", safe_serialization=safe)
    ours.save_pretrained(tmp_path / "ours", safe_serialization=safe)
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert (tmp_path / "ours" / weights).is_file()
    from_peft = lorakit.PeftModel.from_pretrained(MLP(), tmp_path / "peft")
    from_ours = peft.PeftModel.from_pretrained(MLP(), tmp_path / "ours")
    _states_equal(theirs, from_peft, atol=1e-6)
    _states_equal(from_ours, ours)
    assert from_peft.peft_config["default"].velora_config == lorakit.VeloraConfig(3, 1.0, "batch_average_once")
    assert from_ours.peft_config["default"].velora_config == peft.VeloraConfig(3, 1.0, "batch_average_once")
    torch.testing.assert_close(from_peft(x), theirs(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(from_ours(x), ours(x), atol=1e-6, rtol=0)


def test_half_precision_base_keeps_the_projection_in_fp32_as_peft():
    for autocast in (True, False):
        torch.manual_seed(1)
        kw = dict(r=4, init_lora_weights=False, target_modules=["lin0"])
        theirs = peft.get_peft_model(MLP().to(torch.bfloat16), peft.LoraConfig(
            **kw, velora_config=peft.VeloraConfig(num_groups=3, init_type="random")), autocast_adapter_dtype=autocast)
        torch.manual_seed(1)
        ours = lorakit.get_peft_model(MLP().to(torch.bfloat16), lorakit.LoraConfig(
            **kw, velora_config={"num_groups": 3, "init_type": "random"}), autocast_adapter_dtype=autocast)
        _states_equal(theirs, ours)


def test_delete_adapter_removes_its_projection():
    _, model, _ = _pair("random")
    model.add_adapter("other", lorakit.LoraConfig(target_modules=["lin0"], velora_config=lorakit.VeloraConfig(2)))
    assert "base_model.model.lin0.lora_velora_embed.other" in model.state_dict()
    model.delete_adapter("other")
    assert not any(k.endswith(".other") for k in model.state_dict())
    assert "base_model.model.lin0.lora_velora_embed.default" in model.state_dict()


class EmbConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.conv = nn.Embedding(10, 4), nn.Conv2d(4, 4, 3)


@pytest.mark.parametrize("target, kw", [(["emb"], {}), (["conv"], {}), (["lin0"], {"use_dora": True}),
                                        (None, {"target_parameters": ["lin0.weight"]})])
def test_what_peft_refuses_is_a_lorakit_error(target, kw):
    make = EmbConv if target in (["emb"], ["conv"]) else MLP
    with pytest.raises((ValueError, TypeError)):
        peft.get_peft_model(make(), peft.LoraConfig(target_modules=target, velora_config=peft.VeloraConfig(), **kw))
    with pytest.raises(LorakitError, match="VeLoRA|velora_config"):
        lorakit.get_peft_model(make(), lorakit.LoraConfig(target_modules=target, velora_config=lorakit.VeloraConfig(),
                                                          **kw))


@pytest.mark.parametrize("bad, match", [({"num_groups": 0}, "num_groups must be a positive integer"),
                                        ({"scale": -1.0}, "scale must be > 0"),
                                        ({"init_type": "svd"}, "init_type must be"),
                                        ({"groups": 2}, "unknown field")])
def test_bad_velora_config_names_the_field(bad, match):
    with pytest.raises(LorakitError, match=match):
        lorakit.LoraConfig(target_modules=["lin0"], velora_config=bad)
    with pytest.raises(LorakitError, match="velora_config must be a VeloraConfig"):
        lorakit.LoraConfig(target_modules=["lin0"], velora_config="random")


def test_a_compressing_velora_adapter_learns():
    """Lossy compression (g = 8 features per number), the projection re-set per batch: the loss still falls."""
    from conftest import tiny_llama
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
        velora_config=lorakit.VeloraConfig(num_groups=4, init_type="batch_average")))
    torch.manual_seed(0)
    ids = torch.randint(0, 96, (4, 12))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    embed = model.base_model.model.model.layers[0].self_attn.q_proj.lora_velora_embed
    assert embed["default"].shape == (8,) and not embed["default"].any()
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1 and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert torch.linalg.vector_norm(embed["default"]).item() == pytest.approx(1.0, abs=1e-5)


def test_run_config_variant_velora_trains_and_peft_loads_it(tiny_model_dir, data_file, tmp_path):
    from conftest import run_config
    from lorakit.train import train
    result = train(run_config(tiny_model_dir, data_file, tmp_path, "lora.variant=velora", "train.max_steps=3"),
                   progress=False)
    assert result.steps == 3
    from transformers import AutoModelForCausalLM
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path)
    assert loaded.peft_config["default"].velora_config == peft.VeloraConfig()
    assert any(k.endswith("lora_velora_embed.default") for k in loaded.state_dict())
