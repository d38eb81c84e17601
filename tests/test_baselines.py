"""Baselines: weight saliency (exact budget, only selected weights move), LoRA-GA, retraining."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from peft_mape.baselines import (
    lora_unlearn, retrain, salun_unlearn, saliency_candidates, weight_saliency_mask,
)
from peft_mape.common.data import make_loader
from peft_mape.common.stopping import mean_loss

from conftest import tiny_examples, tiny_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_saliency_mask_has_exactly_k_weights_with_the_largest_gradients():
    model = tiny_model("bert")
    forget = tiny_examples("bert", 6, seed=1)
    loader = make_loader(forget, 4)
    masks = weight_saliency_mask(model, loader, 37)
    assert sum(int(m.sum()) for m in masks.values()) == 37
    pool = saliency_candidates(model)
    assert set(masks) == set(pool) and all(".encoder.layer." in n for n in pool)
    assert not any("classifier" in n or "embeddings" in n for n in pool)
    # reference gradient: selected |g| are all >= every unselected |g|
    model.zero_grad()
    for batch in loader:
        model(**batch).loss.mul(len(batch["labels"])).backward()  # mean * B = sum of losses
    grads = {n: p.grad.abs() for n, p in model.named_parameters() if n in pool}
    chosen = torch.cat([grads[n][masks[n]] for n in pool])
    rest = torch.cat([grads[n][~masks[n]] for n in pool])
    assert chosen.min() >= rest.max() - 1e-6
    model.zero_grad(set_to_none=True)
    assert all(p.requires_grad for p in model.parameters())


def test_saliency_budget_is_checked():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="num_weights must be between 1 and"):
        weight_saliency_mask(model, make_loader(tiny_examples("bert", 2), 2), 0)
    with pytest.raises(ValueError, match="exactly one of num_weights= or density="):
        salun_unlearn(model, tiny_examples("bert", 2))
    with pytest.raises(ValueError, match="candidates must be"):
        saliency_candidates(model, "heads")


@pytest.mark.parametrize("method", ["ga", "graddiff"])
def test_salun_changes_only_the_selected_weights_and_raises_the_forget_loss(method):
    model = tiny_model("bert")
    forget, retain = tiny_examples("bert", 6, seed=1), tiny_examples("bert", 10, seed=2)
    before = _state(model)
    report = salun_unlearn(model, forget, retain, num_weights=200, method=method, lr=1e-2, max_steps=10)
    after = _state(model)
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    assert 0 < changed <= 200
    assert sum(report["selected_per_parameter"].values()) == 200 == report["trainable_parameters"]
    assert report["forget_loss_after"] > report["forget_loss_before"]
    assert report["steps"] == 10 and set(report["seconds"]) == {"data", "saliency", "update", "evaluation"}
    assert report["update_norm"] > 0
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_salun_density_and_restore_on_failure():
    model = tiny_model("bert")
    before = _state(model)
    # a retain set whose loss becomes NaN mid-loop: the update fails after weights moved
    calls = {"n": 0}

    def loss_fn(outputs, batch):
        calls["n"] += 1
        losses = torch.nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")
        return losses * float("nan") if calls["n"] > 12 else losses

    with pytest.raises(FloatingPointError):
        salun_unlearn(model, tiny_examples("bert", 4, seed=1), density=0.05, method="ga", lr=1e-2, max_steps=50,
                      loss_fn=loss_fn)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["ga", "graddiff"])
def test_lora_unlearning_raises_the_forget_loss_and_keeps_the_base(method):
    model = tiny_model("bert")
    forget, retain = tiny_examples("bert", 6, seed=1), tiny_examples("bert", 10, seed=2)
    base = _state(model)
    peft_model, report = lora_unlearn(model, forget, retain, method=method, lr=1e-2, max_steps=10)
    assert isinstance(peft_model, PeftModel) and report["method"] == f"lora-{method}"
    assert report["forget_loss_after"] > report["forget_loss_before"] + 0.01
    assert report["trainable_parameters"] == sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    with peft_model.disable_adapter():
        loss_without = mean_loss(peft_model, make_loader(forget, 4), device="cpu")
    assert loss_without == pytest.approx(report["forget_loss_before"], rel=1e-5)
    restored = peft_model.unload()
    assert all(torch.equal(base[k], v) for k, v in restored.state_dict().items())


def test_lora_rejects_unknown_methods_and_graddiff_without_retain():
    with pytest.raises(ValueError, match="unknown method 'npo'"):
        lora_unlearn(tiny_model("bert"), tiny_examples("bert", 2), method="npo")
    with pytest.raises(ValueError, match="needs a non-empty retain set"):
        lora_unlearn(tiny_model("bert"), tiny_examples("bert", 2), method="graddiff")


def test_lora_on_gpt2_conv1d():
    model = tiny_model("gpt2")
    _, report = lora_unlearn(model, tiny_examples("gpt2", 4, seed=1), method="ga", lr=1e-2, max_steps=5)
    assert report["forget_loss_after"] > report["forget_loss_before"]


def test_retrain_fits_the_retain_set():
    model = tiny_model("bert")
    retain = tiny_examples("bert", 12, seed=2)
    loss_before = mean_loss(model, make_loader(retain, 4), device="cpu")
    report = retrain(model, retain, epochs=5, lr=1e-2, batch_size=4)
    assert report["steps"] == 15
    assert mean_loss(model, make_loader(retain, 4), device="cpu") < loss_before - 0.1


@pytest.mark.parametrize("name", ["full-ga", "salun-ga", "lora-ga"])
def test_run_method_by_name(name):
    from peft_mape.baselines.by_name import run_method

    extra = {"num_weights": 100} if name.startswith("salun") else {}
    run = run_method(name, tiny_model("bert"), tiny_examples("bert", 6, seed=1), tiny_examples("bert", 8, seed=2),
                     lr=1e-2, max_steps=5, progress=False, **extra)
    assert run.report["method_name"] == name and run.seconds > 0
    assert run.report["forget_loss_after"] > run.report["forget_loss_before"]


def test_run_method_names_the_choices():
    from peft_mape.baselines.by_name import method_names, run_method

    assert {"mape-graddiff", "full-so", "random-ga", "salun-graddiff", "lora-ga"} <= set(method_names())
    with pytest.raises(ValueError, match="unknown method 'salun-so'"):
        run_method("salun-so", tiny_model("bert"), tiny_examples("bert", 2))


def test_retain_copies_of_forget_examples_are_dropped():
    forget = tiny_examples("bert", 4, seed=1)
    with pytest.warns(UserWarning, match="2 retain example"):
        report = salun_unlearn(tiny_model("bert"), forget, forget[:2] + tiny_examples("bert", 4, seed=2),
                               num_weights=10, method="graddiff", max_steps=1)
    assert report["num_retain"] == 4


def test_run_method_takes_the_mape_config_and_a_shared_selection():
    from peft_mape import MAPEConfig
    from peft_mape.baselines.by_name import run_method

    forget, retain = tiny_examples("bert", 6, seed=1), tiny_examples("bert", 8, seed=2)
    searched = run_method("mape-ga", tiny_model("bert"), forget, retain, config=MAPEConfig(sparsity=0.5), lr=1e-2,
                          max_steps=2, progress=False)
    assert searched.report["sparsity"] == 0.5
    selection = {"heads": searched.report["selected_heads"], "filters": searched.report["selected_filters"]}
    reused = run_method("mape-graddiff", tiny_model("bert"), forget, retain, config=MAPEConfig(sparsity=0.5),
                        selection=selection, lr=1e-2, max_steps=2, progress=False)
    assert reused.report["selected_heads"] == selection["heads"]
    assert reused.report["seconds"]["statistics"] == 0.0  # no mask search ran
    with pytest.raises(ValueError, match="fixes its selection"):
        run_method("full-ga", tiny_model("bert"), forget, retain, selection=selection)
    with pytest.raises(ValueError, match="configures the MAPE families"):
        run_method("lora-ga", tiny_model("bert"), forget, retain, config=MAPEConfig())
