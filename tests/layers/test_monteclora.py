"""layers/monteclora.py: MonteCLoRA against PEFT 0.21.2 (same seed: same weights, draws, outputs, loss)."""

import peft
import pytest
import torch
from peft.tuners.lora.config import MontecloraConfig

import lorakit
from lorakit import LoraConfig, LorakitError


def mlp(dtype=torch.float32):
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 2)).to(dtype)


def pair(dtype=torch.float32, **kw):
    """(PEFT model, lorakit model) with the same seed; a small buffer so training forwards refill it."""
    kw = dict(target_modules=["0", "2"], init_lora_weights=False,
              monteclora_config=MontecloraConfig(num_samples=3, buffer_size=2, use_entropy=True), **kw)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(mlp(dtype), peft.LoraConfig(**kw))
    torch.manual_seed(0)
    ours = lorakit.get_peft_model(mlp(dtype), LoraConfig(**kw))
    return theirs, ours


def test_same_seed_gives_peft_s_weights_keys_and_trainable_parameters():
    theirs, ours = pair()
    a, b = peft.get_peft_model_state_dict(theirs), lorakit.get_peft_model_state_dict(ours)
    assert sorted(a) == sorted(b) and any("lora_monteclora_sampler.std_prior" in k for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    trainable = lambda m: sorted(n.replace(".weight", "") for n, p in m.named_parameters() if p.requires_grad)  # noqa
    assert trainable(theirs) == trainable(ours)


def test_training_forwards_loss_and_gradients_equal_peft_s_and_eval_is_plain_lora():
    theirs, ours = pair(lora_dropout=0.1)
    x = torch.randn(4, 10)
    theirs.train(), ours.train()
    for step in range(5):  # buffer_size=2: steps 2 and 4 refill the sample buffer
        outs, grads = [], []
        for model in (theirs, ours):
            torch.manual_seed(step)
            y = model(x)
            loss = y.square().mean() + model._get_monteclora_loss()
            loss.backward()
            outs.append((y, loss))
            grads.append({n.replace(".weight", ""): p.grad.clone() for n, p in model.named_parameters()
                          if p.grad is not None})
            model.zero_grad()
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-7)
        assert sorted(grads[0]) == sorted(grads[1])
        for n in grads[0]:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)
    theirs.eval(), ours.eval()
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), ours(x))  # eval mode draws nothing
    assert ours._get_monteclora_loss() == 0.0
    with ours.disable_adapter():  # and it is plain LoRA: B·A on top of the base
        base = ours(x)
    assert not torch.allclose(base, ours(x))


def test_files_load_both_ways_and_merge_is_the_eval_forward(tmp_path):
    theirs, ours = pair()
    x = torch.randn(3, 10)
    ours.train()
    ours(x)  # one draw: the sampler's buffers now hold it, and are saved
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    loaded_in_peft = peft.PeftModel.from_pretrained(mlp(), tmp_path / "ours")
    torch.testing.assert_close(loaded_in_peft(x), ours(x), rtol=1e-5, atol=1e-6)
    ours_sd = lorakit.get_peft_model_state_dict(ours)
    for k, v in peft.get_peft_model_state_dict(loaded_in_peft).items():
        torch.testing.assert_close(v, ours_sd[k])
    loaded_in_ours = lorakit.PeftModel.from_pretrained(mlp(), tmp_path / "theirs")
    theirs.eval()
    torch.testing.assert_close(loaded_in_ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    expected = ours(x)
    ours.merge_adapter()
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
    ours.unmerge_adapter()
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)


def test_half_precision_base_keeps_fp32_priors_like_peft():
    theirs, ours = pair(torch.bfloat16)
    dtypes = lambda m: {n.replace(".weight", ""): p.dtype for n, p in m.named_parameters() if "lora_" in n}  # noqa
    assert dtypes(theirs) == dtypes(ours) and set(dtypes(ours).values()) == {torch.float32}


def test_delete_removes_the_sampler_and_bad_configs_are_refused():
    _, ours = pair()
    ours.add_adapter("other", LoraConfig(target_modules=["0"], monteclora_config={"num_samples": 2}))
    layer = ours.base_model.model[0]
    assert sorted(layer.lora_monteclora_sampler) == ["default", "other"]
    ours.delete_adapter("other")
    assert sorted(layer.lora_monteclora_sampler) == ["default"]
    with pytest.raises(LorakitError, match="no field 'samples'"):
        LoraConfig(target_modules=["0"], monteclora_config={"samples": 2})
    with pytest.raises(LorakitError, match="cannot be combined"):
        LoraConfig(target_modules=["0"], monteclora_config={"num_samples": 2}, use_dora=True)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(LorakitError, match="MonteCLoRA adapts linear layers only"):
        lorakit.get_peft_model(conv, LoraConfig(target_modules=["0"], monteclora_config={"num_samples": 2}))
    assert LoraConfig(target_modules=["0"], monteclora_config={}).monteclora_config is None
    saved = LoraConfig(target_modules=["0"], monteclora_config=MontecloraConfig(num_samples=2)).to_dict()
    assert saved["monteclora_config"] == {"num_samples": 2, "use_entropy": False, "dirichlet_prior": 0.1,
                                          "sample_scaler": 1e-4, "kl_loss_weight": 1e-5, "buffer_size": 150}
