"""Stopping on the forget set's distribution, per-example objectives, and the closed-form line search."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model

from peft_mape import MAPEConfig
from peft_mape.common.data import pad_collate
from peft_mape.common.loop import StepLosses
from peft_mape.common.stopping import HoldoutTarget, StepControl
from peft_mape.common.membership import loss_mia_auc
from peft_mape.methods import NPO, GradDiff, GradientAscent
from peft_mape.common.stopping import retain_budget

from conftest import memorised_model, tiny_examples, tiny_model


@pytest.fixture(scope="module")
def memorised():
    torch.set_num_threads(1)
    return memorised_model("llama", epochs=60, lr=1e-2, vary_length=False)


def _fresh(memorised):
    model, forget, retain = memorised
    clone = tiny_model("llama")
    clone.load_state_dict(model.state_dict())
    return get_peft_model(clone.eval(), MAPEConfig(sparsity=0.5)), forget, retain


def _unseen(n=12):
    return tiny_examples("llama", n, seed=9, vary_length=False)


def test_holdout_target_is_the_membership_auc():
    holdout = torch.tensor([1.0, 2.0, 3.0, 4.0])
    target = HoldoutTarget(holdout, tolerance=0.05)
    assert target.level == pytest.approx(2.0) and target.mean == pytest.approx(2.5)  # torch's lower median
    assert target.auc(torch.tensor([0.1, 0.2])) == 1.0  # lower losses than every holdout example: members
    assert target.auc(holdout.clone()) == pytest.approx(0.5)
    assert target.auc(torch.tensor([9.0])) == 0.0
    assert loss_mia_auc([0.1, 0.2], [1.0, 2.0]) == 1.0
    with pytest.raises(ValueError, match="tolerance"):
        HoldoutTarget(holdout, tolerance=0.5)
    with pytest.raises(ValueError, match="holdout is empty"):
        HoldoutTarget(torch.zeros(0))


@pytest.mark.parametrize("method", [GradDiff(), GradientAscent(), NPO()], ids=lambda m: m.name)
def test_examples_at_the_target_level_stop_being_pushed(method):
    forget = torch.tensor([0.5, 3.0, 1.0], requires_grad=True)
    losses = StepLosses(forget=forget, retain=torch.tensor([0.2]), forget_reference=torch.tensor([0.4, 0.4, 0.4]),
                        forget_cap=2.0)
    method.loss(losses).backward()
    assert forget.grad[1] == 0 and forget.grad[0] < 0 and forget.grad[2] < 0  # only those below the cap rise
    plain = type(method)(per_example_cap=False)
    forget.grad = None
    plain.loss(losses).backward()
    assert (forget.grad < 0).all()
    forget.grad = None
    method.loss(StepLosses(forget=forget, retain=losses.retain, forget_reference=losses.forget_reference)).backward()
    assert (forget.grad < 0).all()  # no target, no cap


def test_holdout_stopping_records_each_check_and_why_it_stopped(memorised):
    model, forget, retain = _fresh(memorised)
    report = model.unlearn(forget, retain, method="graddiff", lr=1e-2, max_steps=60, holdout=_unseen(),
                           progress=False)
    stopping = report.diagnostics["stopping"]
    assert stopping["criterion"].startswith("loss membership AUC") and "<= 0.52" in stopping["criterion"]
    assert stopping["checks"][0]["step"] == 0 and stopping["checks"][0]["auc"] > 0.9  # memorised: members
    aucs = [c["auc"] for c in stopping["checks"]]
    if stopping["stop_reason"].startswith("target reached"):
        assert report.stopped_early and aucs[-1] <= 0.52 and all(a > 0.52 for a in aucs[:-1])
        assert stopping["stop_reason"] == f"target reached at step {report.steps}"
    elif report.stopped_early:  # the step control stalled: it ends on its last accepted weights
        assert "smallest step size" in stopping["stop_reason"] and stopping["checks"][-1]["rolled_back"]
        assert all(a > 0.52 for a in aucs)
    else:
        assert stopping["stop_reason"].startswith("step budget")
    # The report's target is the holdout's mean loss; the stop is on the AUC, not on that mean.
    assert report.forget_loss_target == pytest.approx(stopping["holdout_mean_loss"])


def test_a_forget_set_that_already_looks_unseen_gets_no_update(memorised):
    model, _, retain = _fresh(memorised)
    unseen = _unseen()  # the forget set *is* held-out data: the attack is at chance, AUC 0.5
    report = model.unlearn(unseen, retain, method="graddiff", holdout=unseen, progress=False)
    assert report.steps == 0 and report.trainable_parameters == 0
    assert report.diagnostics["stopping"]["stop_reason"].startswith("the forget set already looked unseen")
    assert any("already looks unseen" in w for w in report.warnings)


def test_a_holdout_unlike_the_forget_set_is_not_taken_for_unseen(memorised):
    """Mislabelled examples keep a higher loss than clean held-out data even while the model fits
    them; a holdout with lower losses than the forget set says nothing about "unseen" (here: the
    memorised training sequences play the clean holdout, unseen sequences the forget set)."""
    model, forget, retain = _fresh(memorised)
    report = model.unlearn(_unseen(), retain, method="graddiff", lr=1e-2, max_steps=5, holdout=forget + retain[:6],
                           progress=False)
    assert report.steps == 5 and report.trainable_parameters > 0  # not "already looks unseen"
    assert any("not distributed like the forget set" in w for w in report.warnings)
    assert not any(w.startswith("no holdout") for w in report.warnings)  # one warning, not two that disagree
    from peft_mape.baselines import salun_unlearn

    trained, _, retain = memorised
    plain = tiny_model("llama")
    plain.load_state_dict(trained.state_dict())
    salun = salun_unlearn(plain.eval(), _unseen(), retain, method="ga", max_steps=3,
                          lr=1e-2, density=0.1, holdout=forget + retain[:6])
    assert salun["steps"] == 3 and any("not distributed like the forget set" in w for w in salun["warnings"])


def test_the_line_search_keeps_so_within_the_retain_budget(memorised):
    model, forget, retain = _fresh(memorised)
    spec_model, _, _ = _fresh(memorised)
    spec = spec_model.unlearn(forget, retain, method="so", line_search=False, progress=False)
    searched = model.unlearn(forget, retain, method="so", progress=False)
    search = searched.diagnostics["line_search"]
    assert searched.retain_loss_after <= search["retain_loss_budget"] + 1e-6
    assert search["retain_loss_budget"] == pytest.approx(retain_budget(search["start"]["retain_loss"], 0.1))
    assert all(c["scale"] <= 1.0 for c in search["candidates"])  # no target: never beyond the specification's step
    if spec.retain_loss_after > search["retain_loss_budget"]:
        assert search["scale"] < 1.0
    assert searched.update_norm == pytest.approx(search["step_norm"], rel=1e-4)


def test_with_a_target_the_line_search_takes_the_smallest_scale_that_reaches_it(memorised):
    model, forget, retain = _fresh(memorised)
    report = model.unlearn(forget, retain, method="influence", holdout=_unseen(), retain_tolerance=10.0,
                           progress=False)
    search = report.diagnostics["line_search"]
    allowed = [c for c in search["candidates"] if c["within_retain_budget"]]
    reached = [c for c in allowed if c.get("reached")]
    if reached:
        assert search["scale"] == min(c["scale"] for c in reached)
    else:
        assert search["scale"] == max(c["scale"] for c in allowed)
    assert max(c["scale"] for c in search["candidates"]) <= 4.0
    assert search["linearisation_ratio"] is None or search["linearisation_ratio"] == search["linearisation_ratio"]


def test_closed_form_options_are_checked():
    from peft_mape.methods import SecondOrder

    with pytest.raises(ValueError, match="retain_tolerance"):
        SecondOrder(retain_tolerance=-1)
    with pytest.raises(ValueError, match="max_scale"):
        SecondOrder(max_scale=0)


def test_so_at_the_specification_scale_wrecks_a_memorised_model_and_the_line_search_does_not():
    """On a model that memorised its training set the empirical Fisher is ~0, so the scale-1 SO
    step is huge; the default keeps the retain loss in budget (or applies nothing, and says so)."""
    model, forget, retain = memorised_model("bert", epochs=40, lr=3e-3)
    spec = get_peft_model(model, MAPEConfig(sparsity=0.5)).unlearn(forget, retain, method="so", line_search=False,
                                                                   num_train_examples=30, progress=False)
    assert spec.retain_loss_after > spec.retain_loss_before + 1.0
    model, forget, retain = memorised_model("bert", epochs=40, lr=3e-3)
    default = get_peft_model(model, MAPEConfig(sparsity=0.5)).unlearn(forget, retain, method="so",
                                                                      num_train_examples=30, progress=False)
    search = default.diagnostics["line_search"]
    assert default.retain_loss_after <= search["retain_loss_budget"] + 1e-6
    if search["scale"] == 0.0:
        assert default.update_norm == 0.0 and any("not selective" in w for w in default.warnings)


def test_the_step_control_grows_the_step_and_never_ends_beyond_the_retain_budget(memorised):
    model, forget, retain = _fresh(memorised)
    report = model.unlearn(forget, retain, method="graddiff", holdout=_unseen(), max_steps=40, progress=False)
    stopping = report.diagnostics["stopping"]
    checks = [c for c in stopping["checks"] if c["step"] > 0]
    assert checks and all("next_lr" in c and "retain_loss" in c for c in checks)
    lrs = [c["next_lr"] for c in checks]
    base = report.hyperparameters["lr"]
    assert all(base / 8 <= lr <= base * 64 for lr in lrs)
    accepted = [c for c in checks if not c.get("rolled_back")]
    if accepted and not accepted[0].get("auc", 1.0) <= 0.52:
        assert accepted[0]["next_lr"] == 2 * base  # far from the target: the first accepted check doubles
    # The weights the update ends on were accepted: within the retain budget (report's retain loss
    # is measured on the same retain sample as the step control's).
    assert report.retain_loss_after <= stopping["retain_loss_budget"] + 1e-6
    plain_model, _, _ = _fresh(memorised)
    plain = plain_model.unlearn(forget, retain, method="graddiff", holdout=_unseen(), max_steps=40,
                                step_control=False, progress=False)
    assert all("next_lr" not in c for c in plain.diagnostics["stopping"]["checks"])
    assert "retain_loss_budget" not in plain.diagnostics["stopping"]


def test_the_step_control_stalls_when_the_smallest_step_leaves_the_budget():
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([weight], lr=0.8)
    retain = iter([1.0, 1.0, 5.0, 5.0, 5.0, 5.0])  # start, one accepted check, then every check beyond budget
    control = StepControl([weight], optimizer, lambda: next(retain), tolerance=0.5, lowest_lr=0.2, highest_lr=3.2)
    with torch.no_grad():
        weight.add_(1.0)
    assert control.after_check({}, reached=False) is False and optimizer.param_groups[0]["lr"] == 1.6
    kept = weight.detach().clone()
    lrs = []
    for _ in range(4):
        with torch.no_grad():
            weight.add_(1.0)
        check = {}
        assert control.after_check(check, reached=False) is False and check["rolled_back"]
        assert torch.equal(weight, kept)  # rolled back to the last accepted weights
        lrs.append(check["next_lr"])
        if control.stalled:
            break
    assert lrs == [0.8, 0.4, 0.2, 0.2] and control.stalled  # stalls only after a rollback at the lowest lr


def test_the_loop_stops_at_the_last_accepted_weights_once_the_step_control_stalls(memorised):
    model, forget, retain = _fresh(memorised)
    report = model.unlearn(forget, retain, method="graddiff", holdout=_unseen(), max_steps=200,
                           retain_tolerance=1e-6, progress=False)
    stopping = report.diagnostics["stopping"]
    # A budget of ~1e-7 nats binds almost at once: the loop stops instead of spending its 200 steps.
    assert "smallest step size" in stopping["stop_reason"] and report.stopped_early
    assert report.steps < 200 and stopping["checks"][-1]["rolled_back"]
    assert report.retain_loss_after <= stopping["retain_loss_budget"] + 1e-6


def test_the_default_step_budget_depends_on_whether_a_target_says_when_to_stop():
    assert GradDiff().step_budget(with_target=True) == 300 and GradDiff().step_budget(with_target=False) == 100
    assert GradDiff(max_steps=7).step_budget(with_target=True) == 7
    with pytest.raises(ValueError, match="max_steps must be an integer >= 0, got -1"):
        GradDiff(max_steps=-1).validate()


def test_without_a_target_the_trust_region_guards_but_never_grows_the_step(memorised):
    model, forget, retain = _fresh(memorised)
    report = model.unlearn(forget, retain, method="graddiff", progress=False)
    stopping = report.diagnostics["stopping"]
    base = report.hyperparameters["lr"]
    assert "trust region" in stopping["criterion"] and report.steps <= 100
    checks = stopping["checks"]
    assert checks and all(c["next_lr"] <= base for c in checks)
    assert report.retain_loss_after <= stopping["retain_loss_budget"] + 1e-6
    assert any(w.startswith("no holdout") for w in report.warnings)


def test_after_the_target_the_loop_settles_while_the_retain_loss_falls_and_the_target_holds(memorised):
    model, forget, retain = _fresh(memorised)
    first = model.unlearn(forget, retain, method="graddiff", forget_loss_target=2.0, settle=False, progress=False)
    model, forget, retain = _fresh(memorised)
    settled = model.unlearn(forget, retain, method="graddiff", forget_loss_target=2.0, progress=False)
    reached_at = first.steps
    assert first.diagnostics["stopping"]["stop_reason"] == f"target reached at step {reached_at}"
    reason = settled.diagnostics["stopping"]["stop_reason"]
    assert reason.startswith(f"target reached at step {reached_at}; the retain loss then fell")
    assert settled.steps > reached_at and settled.stopped_early
    # The weights it ends on still meet the target, with a lower retain loss than at the first hit.
    assert settled.forget_loss_after >= 2.0
    assert settled.retain_loss_after < first.retain_loss_after


def test_on_check_records_a_trajectory_of_the_callers_metrics_even_without_a_target(memorised):
    model, forget, retain = _fresh(memorised)
    seen = []

    def on_check(record):
        seen.append(record["step"])
        with torch.no_grad():  # the model holds the weights just checked
            logits = model(**{k: v for k, v in pad_collate(forget).items() if k != "labels"}).logits
        return {"forget_logit_norm": float(logits.norm())}

    report = model.unlearn(forget, retain, method="graddiff", max_steps=30, progress=False, on_check=on_check)
    checks = report.diagnostics["stopping"]["checks"]
    assert seen == [c["step"] for c in checks] == [5, 10, 15, 20, 25, 30]  # eval_every=5
    norms = [c["forget_logit_norm"] for c in checks]
    assert len(set(norms)) == len(norms)  # measured at each check's weights, not at the end
    json.dumps(report.to_dict())  # the callback itself never enters the report
    with pytest.raises(ValueError, match="on_check must be a callable"):
        _fresh(memorised)[0].unlearn(forget, retain, on_check="test acc", progress=False)


def test_on_check_without_trust_region_or_target_still_checks(memorised):
    model, forget, retain = _fresh(memorised)
    report = model.unlearn(forget, retain, method=GradDiff(step_control=False, max_steps=20, eval_every=5),
                           progress=False, on_check=lambda record: {"seen": True})
    checks = report.diagnostics["stopping"]["checks"]
    assert [c["step"] for c in checks] == [5, 10, 15, 20] and all(c["seen"] for c in checks)
