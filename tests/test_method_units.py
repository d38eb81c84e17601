"""Methods as units: names and instances are the same call, options are checked per method, a
user-defined method plugs in without editing the library, and the phases compose to unlearn()."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch
from peft import get_peft_model

import peft_mape
from peft_mape import MAPEConfig
from peft_mape.methods import (
    NPO, ClosedFormMethod, GradDiff, GradientAscent, Influence, LoopMethod, SecondOrder, StepLosses, register_method,
)
from peft_mape.unlearning import (
    RunOptions, apply_selection, build_report, fixed_selection, mask_search, mask_statistics, measure, prepare,
    update,
)
from peft_mape.unlearning.phases import Measurements

from conftest import memorised_model


def _model(kind="bert"):
    model, forget, retain = memorised_model(kind, epochs=6, lr=1e-2)
    return get_peft_model(model, MAPEConfig(sparsity=0.5)), forget, retain


def _numbers(report):
    return (report.selected_heads, report.selected_filters, report.forget_loss_after, report.retain_loss_after,
            report.update_norm, report.steps)


@pytest.mark.parametrize("name, instance, options", [
    ("npo", NPO(beta=0.5, lr=1e-2, max_steps=3), dict(beta=0.5, lr=1e-2, max_steps=3)),
    ("graddiff", GradDiff(retain_weight=0.5, lr=1e-2, max_steps=3), dict(retain_weight=0.5, lr=1e-2, max_steps=3)),
    ("ga", GradientAscent(lr=1e-2, max_steps=3, kl_weight=0.5), dict(lr=1e-2, max_steps=3, kl_weight=0.5)),
    ("so", SecondOrder(damping=1.0, scale=0.5, num_train_examples=30), dict(damping=1.0, scale=0.5,
                                                                              num_train_examples=30)),
    ("influence", Influence(solver_steps=3, num_train_examples=30), dict(solver_steps=3, num_train_examples=30)),
])
def test_a_name_with_options_and_an_instance_are_the_same_call(name, instance, options):
    model_a, forget, retain = _model()
    by_name = model_a.unlearn(forget, retain, method=name, progress=False, **options)
    model_b, forget, retain = _model()
    by_instance = model_b.unlearn(forget, retain, method=instance, progress=False)
    assert _numbers(by_name) == _numbers(by_instance)
    assert by_name.method == by_instance.method == name
    for option, value in options.items():
        assert by_instance.hyperparameters[option] == value


@pytest.mark.parametrize("method, option, listed", [
    ("graddiff", "damping", "retain_weight"),
    ("so", "lr", "damping"),
    ("ga", "beta", "max_steps"),
    ("influence", "npo_beta", "hessian_examples"),
])
def test_an_option_the_method_does_not_have_is_a_clear_error(method, option, listed):
    model, forget, retain = _model()
    with pytest.raises(ValueError, match=rf"method '{method}' has no option '{option}'.*{listed}"):
        model.unlearn(forget, retain, method=method, progress=False, **{option: 1.0})
    assert model.base_model.adapter_parameters("default") == []


@pytest.mark.parametrize("make, message", [
    (lambda: NPO(beta=0), "beta must be positive"),
    (lambda: GradDiff(lr=-1.0), "lr must be > 0"),
    (lambda: GradientAscent(max_steps=-2), "max_steps must be an integer >= 0"),
    (lambda: Influence(solver="lbfgs"), "solver must be one of"),
    (lambda: SecondOrder(num_train_examples=0), "num_train_examples must be positive"),
])
def test_bad_option_values_fail_where_the_method_is_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@dataclass
class CappedAscent(LoopMethod):
    """Gradient ascent that stops pushing an example once its loss passes ``cap``."""

    cap: float = 5.0
    name = "capped-ga"

    def loss(self, losses: StepLosses):
        return -losses.forget.clamp(max=self.cap).mean()


@dataclass
class ScaledSignStep(ClosedFormMethod):
    """A closed-form toy: move every selected delta by -scale * sign(forget gradient)."""

    scale: float = 1e-3
    name = "sign-step"

    def step(self, context):
        from peft_mape.unlearning.statistics import parameter_gradient_sum

        data = context.data
        grads = parameter_gradient_sum(context.tuner, context.adapter_name, data.forget_loader, data.loss_fn,
                                       device=data.device, progress=False)
        with torch.no_grad():
            for param, grad in zip(context.params, grads):
                param.add_(self.scale * grad.sign())
        from peft_mape.methods import StepResult

        return StepResult(diagnostics={"moved": len(context.params)})


def test_a_user_defined_loop_method_plugs_in_without_editing_the_library():
    model, forget, retain = _model()
    report = model.unlearn(forget, retain, method=CappedAscent(cap=3.0, lr=1e-2, max_steps=4), progress=False)
    assert report.method == "capped-ga" and report.steps == 4
    assert report.forget_loss_after > report.forget_loss_before
    assert report.hyperparameters["cap"] == 3.0
    # The capped loss equals plain ascent while every loss is below the cap, so the first steps agree.
    same, forget, retain = _model()
    plain = same.unlearn(forget, retain, method=GradientAscent(lr=1e-2, max_steps=1), progress=False)
    model_c, forget, retain = _model()
    capped = model_c.unlearn(forget, retain, method=CappedAscent(cap=1e6, lr=1e-2, max_steps=1), progress=False)
    assert plain.forget_loss_after == pytest.approx(capped.forget_loss_after, rel=1e-6)


def test_a_user_defined_closed_form_method_and_registration_by_name():
    register_method(ScaledSignStep)
    try:
        model, forget, retain = _model()
        report = model.unlearn(forget, retain, method="sign-step", scale=1e-2, num_train_examples=30,
                               progress=False)
        assert report.method == "sign-step" and report.diagnostics["moved"] > 0
        assert report.update_norm > 0 and report.forget_loss_after > report.forget_loss_before
        with pytest.raises(ValueError, match="method 'sign-step' has no option 'lr'"):
            _model()[0].unlearn(forget, retain, method="sign-step", lr=1.0, progress=False)
    finally:
        peft_mape.METHODS.pop("sign-step", None)


def test_the_phases_compose_to_unlearn():
    model, forget, retain = _model()
    expected = model.unlearn(forget, retain, method="graddiff", lr=1e-2, max_steps=3, progress=False)

    model, forget, retain = _model()
    tuner = model.base_model
    torch.manual_seed(0)
    data = prepare(tuner.model, forget, retain, options=RunOptions(progress=False))
    statistics = mask_statistics(tuner, data, tuner.peft_config["default"].objective)
    result = mask_search(tuner, "default", data, statistics)
    apply_selection(tuner, "default", result, data)
    method = GradDiff(lr=1e-2, max_steps=3)
    outcome = update(tuner, "default", method, data)
    forget_after, retain_after = measure(data)
    report = build_report(tuner, "default", method, data, result=result, outcome=outcome,
                          losses=Measurements(statistics.forget_loss, forget_after, statistics.retain_loss,
                                              retain_after))
    assert _numbers(report) == _numbers(expected)
    assert set(report.seconds) == {"data", "statistics", "search", "update", "evaluation"}


def test_one_search_serves_several_updates_through_the_phases():
    model, forget, retain = _model()
    tuner = model.base_model
    data = prepare(tuner.model, forget, retain, options=RunOptions(progress=False))
    searched = mask_search(tuner, "default", data, mask_statistics(tuner, data, "mlr"))
    selection = searched.selection()
    again, forget, retain = _model()
    fixed = fixed_selection(again.base_model, "default", selection)
    assert fixed.selection() == selection


def test_help_shows_the_options_of_unlearn():
    signature = inspect.signature(peft_mape.MAPEModel.unlearn)
    assert {"forget", "retain", "method", "holdout", "forget_loss_target", "selection"} <= set(signature.parameters)
    doc = peft_mape.MAPEModel.unlearn.__doc__
    for word in ("peft_mape.methods", "RunOptions", "kl_weight", "seed", "batch_size"):
        assert word in doc


def test_no_function_in_the_package_takes_more_than_ten_parameters():
    import ast
    from pathlib import Path

    too_many = []
    for path in Path(peft_mape.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                count = len(names) - (names[:1] in (["self"], ["cls"])) + bool(a.vararg) + bool(a.kwarg)
                if count > 10:
                    too_many.append(f"{path.name}:{node.name} ({count})")
    assert not too_many, too_many
