"""unlearn(): update rules, reports, bad input and rollback on failure."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader

import peft_mape
from peft_mape import MAPEConfig, UnlearnReport
from peft_mape.common.data import per_example_losses, pad_collate

from conftest import memorised_model, tiny_examples, tiny_model


def _peft(kind="bert", sparsity=0.5, dtype=torch.float32, **config):
    return get_peft_model(tiny_model(kind).to(dtype), MAPEConfig(sparsity=sparsity, **config))


def _base_state(model):
    return {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "mape_" not in k}


def test_so_step_equals_a_dense_reference():
    """theta* + (1/n) (F_r + lambda)^-1 sum_f grad, computed independently with a per-example loop."""
    model = _peft(dtype=torch.float64)
    forget, retain = tiny_examples("bert", 6, seed=1), tiny_examples("bert", 10, seed=2)
    selection = {"heads": {"0": [1], "1": [2]}, "filters": {"0": [3, 4]}}
    # Reference on a twin adapter: same selection, explicit gradients.
    model.add_adapter("ref", MAPEConfig(sparsity=0.5))
    model.base_model.apply_selection("ref", selection)
    model.set_adapter("ref")
    params = model.base_model.adapter_parameters("ref")
    grad_sum = [torch.zeros_like(p) for p in params]
    fisher = [torch.zeros_like(p) for p in params]
    for ex in forget:
        for acc, g in zip(grad_sum, torch.autograd.grad(per_example_losses(model, pad_collate([ex]), None).sum(), params)):
            acc.add_(g)
    for ex in retain:
        for acc, g in zip(fisher, torch.autograd.grad(per_example_losses(model, pad_collate([ex]), None).sum(), params)):
            acc.add_(g.pow(2) / len(retain))
    lam = 1e-3 * sum(float(f.sum()) for f in fisher) / sum(f.numel() for f in fisher)
    expected = [g / 100 / (f + lam) for g, f in zip(grad_sum, fisher)]

    model.set_adapter("default")
    report = model.unlearn(forget, retain, method="so", selection=selection, num_train_examples=100, progress=False)
    got = model.base_model.adapter_parameters("default")
    for e, g in zip(expected, got):
        assert g.dtype == torch.float64
        assert torch.allclose(e, g, rtol=1e-9, atol=1e-12)
    assert report.update_norm == pytest.approx(sum(float(e.pow(2).sum()) for e in expected) ** 0.5, rel=1e-9)


def _memorised_model(kind="bert"):
    return memorised_model(kind, epochs=40, lr=3e-3)


@pytest.mark.parametrize("method", ["ga", "graddiff"])
def test_methods_raise_forget_loss(method):
    model, forget, retain = _memorised_model()
    peft_model = get_peft_model(model, MAPEConfig(sparsity=0.5))
    report = peft_model.unlearn(forget, retain, method=method, progress=False, max_steps=30, lr=1e-2)
    assert report.forget_loss_after > report.forget_loss_before + 0.05
    if method == "graddiff":
        assert report.retain_loss_after < report.retain_loss_before + 0.5


def test_early_stop_at_forget_loss_target():
    model, forget, retain = _memorised_model()
    peft_model = get_peft_model(model, MAPEConfig(sparsity=0.5))
    report = peft_model.unlearn(forget, retain, method="graddiff", forget_loss_target=1.0, lr=1e-2,
                                max_steps=200, progress=False)
    assert report.stopped_early and report.steps < 200
    assert report.forget_loss_after >= 1.0


def test_report_is_json_and_counts_trainable_owned_parameters(capsys):
    model = _peft(sparsity=0.5)
    report = model.unlearn(tiny_examples("bert", 4), tiny_examples("bert", 8, seed=3), method="ga",
                           max_steps=2, progress=False)
    assert isinstance(report, UnlearnReport)
    payload = json.loads(report.to_json())
    assert payload["num_selected_heads"] == 4 and payload["num_selected_filters"] == 24
    assert set(payload["seconds"]) == {"data", "statistics", "search", "update", "evaluation"}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == report.trainable_parameters
    # hand count: 4 heads x (q,k,v rows 4x16 + 4 bias each, o cols 16x4) + 24 filters x (up row 16 + 1, down col 16)
    assert trainable == 4 * (3 * (4 * 16 + 4) + 16 * 4) + 24 * (16 + 1 + 16)
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_inputs_accepted_as_dataset_and_dataloader():
    import datasets

    forget = tiny_examples("bert", 4, vary_length=False)
    retain = tiny_examples("bert", 8, seed=5, vary_length=False)
    ds = datasets.Dataset.from_list([{k: v.tolist() for k, v in ex.items()} | {"text": "x"} for ex in forget])
    loader = DataLoader(retain, batch_size=3, collate_fn=pad_collate)
    report = _peft().unlearn(ds, loader, method="ga", max_steps=1, progress=False)
    assert report.num_forget == 4 and report.num_retain == 8


def test_same_seed_same_selection():
    forget, retain = tiny_examples("llama", 4), tiny_examples("llama", 12, seed=4)
    a = _peft("llama").unlearn(forget, retain, method="ga", max_steps=1, seed=7, progress=False)
    b = _peft("llama").unlearn(forget, retain, method="ga", max_steps=1, seed=7, progress=False)
    assert (a.selected_heads, a.selected_filters) == (b.selected_heads, b.selected_filters)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, f, r: m.unlearn([], r), "forget set is empty"),
        (lambda m, f, r: m.unlearn([{k: v for k, v in e.items() if k != "labels"} for e in f], r), "no loss"),
        (lambda m, f, r: m.unlearn(f, r, sparsity=1.0), "sparsity"),
        (lambda m, f, r: m.unlearn(f, r, sparsity=0), "sparsity"),
        (lambda m, f, r: m.unlearn(f, r, method="magic"), "unknown unlearning method"),
        (lambda m, f, r: m.unlearn([{"text": "hello"}], r), "not model-ready"),
        (lambda m, f, r: m.unlearn(f, None, method="graddiff"), "needs a non-empty retain"),
        (lambda m, f, r: m.unlearn(f, r, forget_loss_before=1.0), "no option .forget_loss_before"),
        (lambda m, f, r: m.unlearn(f, r, eval_batch_size=0), "eval_batch_size"),
    ],
)
def test_bad_input_gives_clear_errors(call, message):
    model = _peft()
    with pytest.raises(ValueError, match=message):
        call(model, tiny_examples("bert", 3), tiny_examples("bert", 6, seed=2))
    assert model.base_model.adapter_parameters("default") == []


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="sparsity"):
        MAPEConfig(sparsity=1.5)
    with pytest.raises(ValueError, match="update_scope"):
        MAPEConfig(update_scope="everything")
    with pytest.raises(ValueError, match="units"):
        MAPEConfig(units="neurons")


def test_non_finite_loss_is_an_error_and_rolls_back():
    model = _peft()
    before = _base_state(model)

    def nan_loss(outputs, batch):
        return outputs.logits.sum(-1) * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite"):
        model.unlearn(tiny_examples("bert", 3), tiny_examples("bert", 6), loss_fn=nan_loss, progress=False)
    after = _base_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.peft_config["default"].selection is None


def test_duplicates_are_dropped_from_retain_with_a_warning():
    forget = tiny_examples("bert", 3)
    retain = tiny_examples("bert", 6, seed=9) + [dict(forget[0])]
    with pytest.warns(UserWarning, match="identical to forget"):
        report = _peft().unlearn(forget, retain, method="ga", max_steps=1, progress=False)
    assert report.num_retain == 6


def test_failure_mid_update_restores_everything(monkeypatch):
    model = _peft()
    model.unlearn(tiny_examples("bert", 3), tiny_examples("bert", 6, seed=2), method="ga", max_steps=3, lr=1e-2,
                  progress=False)
    model.add_adapter("second", MAPEConfig(sparsity=0.5))
    model.base_model.set_adapter(["default", "second"])
    first = [p.detach().clone() for p in model.base_model.adapter_parameters("default")]
    base = _base_state(model)
    x = tiny_examples("bert", 4, seed=11, vary_length=False)
    batch = {k: v for k, v in pad_collate(x).items() if k != "labels"}
    outputs_before = model(**batch).logits

    calls = {"n": 0}
    real_step = torch.optim.Adam.step

    def failing_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", failing_step)
    with pytest.raises(RuntimeError, match="injected failure"):
        model.unlearn(tiny_examples("bert", 3, seed=4), tiny_examples("bert", 6, seed=5), method="ga",
                      max_steps=10, adapter_name="second", progress=False)
    assert calls["n"] == 3  # it really failed mid-update, after two applied steps
    assert model.peft_config["second"].selection is None
    assert model.base_model.adapter_parameters("second") == []
    assert all(torch.equal(a, b) for a, b in zip(first, model.base_model.adapter_parameters("default")))
    after = _base_state(model)
    assert all(torch.equal(base[k], after[k]) for k in base)
    assert torch.equal(model(**batch).logits, outputs_before)


def test_second_request_on_the_same_adapter_is_refused():
    model = _peft()
    model.unlearn(tiny_examples("bert", 3), tiny_examples("bert", 6), method="ga", max_steps=1, progress=False)
    with pytest.raises(ValueError, match="already holds an unlearning request"):
        model.unlearn(tiny_examples("bert", 3), tiny_examples("bert", 6), method="ga", max_steps=1, progress=False)


def test_default_method_is_documented_choice():
    assert peft_mape.DEFAULT_METHOD in peft_mape.METHODS


def test_bf16_model_keeps_fp32_deltas_and_statistics():
    model = get_peft_model(tiny_model("llama").to(torch.bfloat16), MAPEConfig(sparsity=0.5))
    report = model.unlearn(tiny_examples("llama", 3), tiny_examples("llama", 6, seed=2), method="so",
                           num_train_examples=20, progress=False)
    params = model.base_model.adapter_parameters("default")
    assert params and all(p.dtype == torch.float32 for p in params)
    assert report.update_norm > 0 and all(torch.isfinite(p).all() for p in params)
    x = pad_collate(tiny_examples("llama", 2, seed=3, vary_length=False))
    assert model(input_ids=x["input_ids"]).logits.dtype == torch.bfloat16


def test_no_update_when_the_forget_set_already_looks_unseen():
    """No statistics, selection or update: the report says so."""
    model = _peft()
    report = model.unlearn(tiny_examples("bert", 3), tiny_examples("bert", 6, seed=2), forget_loss_target=0.0,
                           progress=False)
    assert report.steps == 0 and report.stopped_early and report.update_norm == 0.0
    assert report.num_selected_heads == 0 and report.seconds["statistics"] == 0.0
    assert any("no update" in w for w in report.warnings)
    assert model.peft_config["default"].selection is None


def test_eval_batch_size_changes_no_reported_number():
    """The no-grad loss passes run length-sorted in larger batches; the means are the same."""
    forget, retain = tiny_examples("llama", 7), tiny_examples("llama", 12, seed=4)
    kwargs = dict(method="graddiff", max_steps=3, lr=1e-2, batch_size=2, forget_loss_target=50.0, progress=False)
    small = _peft("llama").unlearn(forget, retain, eval_batch_size=1, **kwargs)
    large = _peft("llama").unlearn(forget, retain, eval_batch_size=64, **kwargs)
    for key in ("forget_loss_before", "forget_loss_after", "retain_loss_before", "retain_loss_after"):
        assert getattr(small, key) == pytest.approx(getattr(large, key), rel=1e-5), key
    assert small.diagnostics["forget_loss_trace"] == pytest.approx(large.diagnostics["forget_loss_trace"], rel=1e-5)


def test_the_phases_reuse_a_measured_forget_loss(monkeypatch):
    """Several methods from one original, composed from the phases: the caller's measured loss is
    reported and no forget pass runs before the update (the after-pass still does)."""
    import peft_mape.unlearning.preparation as module
    from peft_mape.unlearning.phases import request_scope
    from peft_mape.unlearning.unlearn import prepare_request, resolve_run, unlearn_prepared

    forget, retain = tiny_examples("llama", 5), tiny_examples("llama", 8, seed=4)
    selection = {"heads": {"0": [1]}, "filters": {"1": [2, 3]}}
    measured = _peft("llama").unlearn(forget, retain, method="ga", max_steps=0, selection=selection,
                                      progress=False).forget_loss_before
    passes = []
    real_mean_loss = module.mean_loss
    monkeypatch.setattr(module, "mean_loss", lambda model, loader, *a, **k: passes.append(len(loader.dataset))
                        or real_mean_loss(model, loader, *a, **k))
    tuner = _peft("llama").base_model
    run, method = resolve_run("ga", {"max_steps": 2, "progress": False})
    with request_scope(tuner, "default", {}):
        data, _ = prepare_request(tuner, "default", forget, retain, run, method)
        with pytest.raises(ValueError, match="forget_loss_before"):
            unlearn_prepared(tuner, "default", method, data, selection=selection, forget_loss_before=float("nan"))
        report = unlearn_prepared(tuner, "default", method, data, selection=selection, forget_loss_before=measured)
    assert report.forget_loss_before == measured
    assert passes.count(len(forget)) == 1  # the after-pass only


def test_select_units_then_allocated_equals_one_unlearn_call():
    """The two stages of the FSDP2 path, in one process: the search alone changes nothing, and
    updating deltas allocated from its selection is the one-call result."""
    base, forget, retain = _memorised_model()
    searched = get_peft_model(copy.deepcopy(base), MAPEConfig(sparsity=0.9))
    selection = searched.select_units(forget, retain, progress=False)
    assert not searched.peft_config["default"].selection and not searched.base_model.adapter_parameters("default")
    assert searched.peft_config["default"].sparsity == 0.9
    whole = get_peft_model(copy.deepcopy(base), MAPEConfig(sparsity=0.9))
    expected = whole.unlearn(forget, retain, max_steps=10, progress=False)
    assert selection == whole.peft_config["default"].selection

    staged = get_peft_model(copy.deepcopy(base), MAPEConfig(sparsity=0.9, selection=selection))
    before = [p.data_ptr() for p in staged.base_model.adapter_parameters("default")]
    report = staged.unlearn(forget, retain, selection="allocated", max_steps=10, progress=False)
    assert [p.data_ptr() for p in staged.base_model.adapter_parameters("default")] == before  # never re-allocated
    assert report.steps == expected.steps
    assert report.forget_loss_after == pytest.approx(expected.forget_loss_after, rel=1e-6)

    with pytest.raises(ValueError, match="non-zero deltas"):
        staged.unlearn(forget, retain, selection="allocated", progress=False)
    empty = get_peft_model(copy.deepcopy(base), MAPEConfig(sparsity=0.9))
    with pytest.raises(ValueError, match="holds no selection"):
        empty.unlearn(forget, retain, selection="allocated", progress=False)
