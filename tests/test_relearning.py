"""Relearning attack: it relearns, reports both halves, and leaves the model as it was."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_mape import MAPEConfig
from peft_mape.evaluation import relearning_attack, split_forget_set

from conftest import tiny_examples, tiny_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_attack_lowers_the_forget_loss_and_restores_the_model():
    model = tiny_model("bert")
    forget = tiny_examples("bert", 8, seed=1)
    before_state = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    result = relearning_attack(model, forget, steps=10, lr=1e-2, batch_size=4)
    assert result.attack_examples == 4 and result.heldout_examples == 4 and result.steps == 10
    assert set(result.before) == set(result.after) == {"heldout", "all"}
    assert set(result.after["all"]) == {"loss", "acc"}
    # descent on half of the set lowers the loss of the whole set (the attack half is in it)
    assert result.after["all"]["loss"] < result.before["all"]["loss"] - 0.05
    assert result.recovery("all") < 0
    after_state = _state(model)
    assert all(torch.equal(before_state[k], after_state[k]) for k in before_state)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())


def test_without_restore_the_relearned_weights_stay():
    model = tiny_model("bert")
    before_state = _state(model)
    relearning_attack(model, tiny_examples("bert", 4, seed=1), steps=2, lr=1e-2, restore=False)
    assert any(not torch.equal(before_state[k], v) for k, v in model.state_dict().items())


def test_attack_on_a_mape_adapter_restores_base_and_delta():
    peft_model = get_peft_model(tiny_model("bert"), MAPEConfig(sparsity=0.5))
    peft_model.base_model.apply_selection("default", {"heads": {"0": [1]}, "filters": {"1": [0, 2]}})
    with torch.no_grad():
        for p in peft_model.base_model.adapter_parameters("default"):
            p.normal_(0, 0.1)
    before_state = _state(peft_model)
    deltas = peft_model.base_model.adapter_parameters("default")
    result = relearning_attack(peft_model, tiny_examples("bert", 6, seed=1), steps=3, lr=1e-2, params=deltas)
    assert result.after["all"]["loss"] != result.before["all"]["loss"]
    assert all(torch.equal(before_state[k], v) for k, v in peft_model.state_dict().items())
    # the base weights were frozen and stay frozen
    assert not peft_model.get_base_model().classifier.weight.requires_grad


def test_failed_attack_restores_the_model():
    model = tiny_model("bert")
    before_state = _state(model)
    calls = []

    def metrics(m, loader):
        calls.append(1)
        if len(calls) > 2:  # after the attack ran: fail while the weights are modified
            raise RuntimeError("metric failed")
        return {"loss": 0.0}

    with pytest.raises(RuntimeError, match="metric failed"):
        relearning_attack(model, tiny_examples("bert", 4, seed=1), steps=2, lr=1e-2, metrics=metrics)
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())


def test_language_model_metrics_have_no_accuracy():
    result = relearning_attack(tiny_model("gpt2"), tiny_examples("gpt2", 4, seed=1), steps=1)
    assert set(result.after["heldout"]) == {"loss"}


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="at least 2 forget examples"):
        relearning_attack(tiny_model("bert"), tiny_examples("bert", 1, seed=1))
    with pytest.raises(ValueError, match="steps must be"):
        relearning_attack(tiny_model("bert"), tiny_examples("bert", 4, seed=1), steps=0)
    attack, heldout = split_forget_set(list(range(5)), seed=3)
    assert len(attack) == 2 and len(heldout) == 3 and sorted(attack + heldout) == list(range(5))
