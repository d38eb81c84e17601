"""``unlearn()``: prepare -> statistics -> search -> apply selection -> update -> measure, with rollback."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..common.data import fingerprint
from ..common.distributed import refuse_sharded
from ..common.stopping import check_target, target_mean, target_summary
from .report import UnlearnReport
from .statistics import RetainStatistics
from .methods import DEFAULT_METHOD, UnlearningMethod, resolve_method
from .phases import (
    Measurements, UpdateOutcome, adapter_to_fill, allocated_selection, apply_selection, build_report, fixed_selection, mask_search,
    mask_statistics, measure, request_scope, update,
)
from .preparation import RUN_OPTION_NAMES, RunOptions, UnlearningData, holdout_target, prepare


def resolve_run(method, options: dict, default: str = DEFAULT_METHOD) -> tuple[RunOptions, UnlearningMethod]:
    """Keyword options of ``unlearn()`` split into the run's (:class:`RunOptions`) and the method's,
    and the method instance; an option neither has is an error naming both sets."""
    run = {k: v for k, v in options.items() if k in RUN_OPTION_NAMES}
    method_options = {k: v for k, v in options.items() if k not in RUN_OPTION_NAMES}
    return RunOptions(**run), resolve_method(method, method_options, default, RUN_OPTION_NAMES)


def prepare_request(tuner, adapter_name: str, forget, retain, run: RunOptions, method: UnlearningMethod, *,
                    holdout=None, target: Optional[float] = None, exclude=()) -> tuple[UnlearningData, Optional[float]]:
    """Seed, prepare the request's data (leaving ``exclude``d examples out of the retain sample)
    and, given a ``holdout`` and no ``target``, measure the stopping target."""
    max_retain = tuner.peft_config[adapter_name].max_retain_examples
    torch.manual_seed(run.seed)
    data = prepare(tuner.model, forget, retain, options=run, exclude=exclude, max_retain_examples=max_retain)
    if target is None and holdout is not None:
        target = holdout_target(data, holdout, max_retain)
    return data, target


def unlearn(tuner, forget, retain=None, method=None, *, holdout=None, forget_loss_target: Optional[float] = None,
            selection=None, adapter_name: Optional[str] = None, **options) -> UnlearnReport:
    """Erase the influence of ``forget`` into one MAPE adapter and return a report.

    Args:
        forget: the examples to erase (``datasets.Dataset``, torch Dataset of model-ready dicts,
            or a DataLoader of dict batches). For causal LMs, label prompt tokens -100 so the
            loss covers the answer only (``peft_mape.common.causal_lm`` builds such examples).
        retain: a sample of the remaining training data (capped at ``max_retain_examples``).
        method: the update rule (SPEC §4): a name — "graddiff" (default), "ga", "npo", "so",
            "influence" — or an instance of a :mod:`peft_mape.methods` class such as
            ``NPO(beta=0.5, lr=1e-3)``, including your own subclass of ``LoopMethod`` /
            ``ClosedFormMethod``.
        holdout: data the model never trained on, of the forget set's kind; loop methods stop
            once a loss-based membership attack no longer tells the forget set from it.
        forget_loss_target: an explicit stopping target instead of ``holdout``.
        selection: skip the mask search and update these units: ``"all"`` (every head and filter:
            the full-parameter baseline), ``"random"`` (random units at the same budget),
            ``{"heads": {layer: [...]}, "filters": {...}}``, or ``"allocated"``: update the zero
            deltas the adapter already holds (made with ``MAPEConfig(selection=...)``, e.g. from
            :func:`select_units`), never re-allocating them: the second stage of an FSDP2 run,
            whose parameter shapes are fixed once the model is sharded.
        adapter_name: the (empty) adapter to fill; default the single active adapter.
        **options: the method's options (e.g. ``lr``, ``max_steps``, ``kl_weight``, ``beta``,
            ``damping``: see ``peft_mape.methods``) and the run's (:class:`RunOptions`: ``seed``,
            ``batch_size``, ``eval_batch_size``, ``loss_fn``, ``progress``,
            ``fold_other_adapters``, ``on_check``, and the search overrides ``sparsity``, ``units``,
            ``objective``). An option the method does not have is an error.

    On any exception the adapter is restored to its previous (empty) state; base weights and
    other adapters are never written.
    """
    run, chosen = resolve_run(method, options)
    allocated = allocated_selection(selection)
    name = adapter_to_fill(tuner, adapter_name, allocated=allocated)
    overrides = {"sparsity": run.sparsity, "units": run.units, "objective": run.objective}
    with request_scope(tuner, name, overrides, run.fold_other_adapters, allocated=allocated):
        data, target = prepare_request(tuner, name, forget, retain, run, chosen, holdout=holdout,
                                       target=forget_loss_target)
        return unlearn_prepared(tuner, name, chosen, data, target=target, selection=selection)


def select_units(tuner, forget, retain=None, *, adapter_name: Optional[str] = None, **options) -> dict:
    """The statistics and search phases alone: the units ``unlearn()`` would update, as a
    selection dict for ``MAPEConfig(selection=...)``. Nothing is allocated or changed. The first
    stage of a sharded (FSDP2) run: build the model to update with this selection, shard it, then
    ``unlearn(..., selection="allocated")``. ``options`` are the run options of ``unlearn()``
    (``seed``, ``batch_size``, ``loss_fn``, ``progress``, ``sparsity``, ``units``, ``objective``)."""
    run = RunOptions(**options)
    name = adapter_to_fill(tuner, adapter_name)
    overrides = {"sparsity": run.sparsity, "units": run.units, "objective": run.objective}
    config = tuner.peft_config[name]
    previous = {key: getattr(config, key) for key in overrides}
    try:
        with request_scope(tuner, name, overrides, run.fold_other_adapters):
            torch.manual_seed(run.seed)
            data = prepare(tuner.model, forget, retain, options=run, max_retain_examples=config.max_retain_examples)
            return mask_search(tuner, name, data, mask_statistics(tuner, data, config.objective)).selection()
    finally:
        for key, value in previous.items():
            setattr(config, key, value)


def unlearn_prepared(tuner, adapter_name: str, method, data: UnlearningData, *, target: Optional[float] = None,
                     selection=None, retain_statistics: Optional[RetainStatistics] = None,
                     forget_loss_before: Optional[float] = None) -> UnlearnReport:
    """The phases after prepare, inside a :func:`request_scope`: statistics and search (or a
    given ``selection``, or cached ``retain_statistics`` at the original weights whose rows of
    this request's forget examples are dropped), then the update and the measurements.

    ``forget_loss_before``: the forget loss at the current weights when the caller has already
    measured it (several methods from one original); it must be finite and is trusted as given.
    """
    if forget_loss_before is not None and not math.isfinite(forget_loss_before):
        raise ValueError(f"forget_loss_before must be a finite number, got {forget_loss_before}")
    if method.needs_retain and not data.retain_examples:
        hint = " (or pass retain_weight=0 for NPO without a retain term)" if method.name == "npo" else ""
        raise ValueError(f"method '{method.name}' needs a non-empty retain set{hint}")
    if method.closed_form:  # before any work, not at the solve
        refuse_sharded(tuner.model, f"method '{method.name}' (a closed-form step)",
                       instead="use a loop method (graddiff, ga, npo), or DDP / one process")
    config = tuner.peft_config[adapter_name]
    forget_before, first_check, holdout_mismatched = forget_loss_before, None, False
    if target is not None:
        with data.timer.phase("evaluation"):
            first_check = check_target(data.model, data.forget_eval_loader, target, loss_fn=data.loss_fn,
                                       device=data.device, known_mean=forget_before)
        forget_before = first_check["forget_loss"]
        if first_check.get("mismatched"):  # the holdout cannot tell when the forget set looks unseen
            data.report_warnings.append(target.mismatch_warning(first_check["auc"]))
            target, first_check, holdout_mismatched = None, None, True
        elif first_check["reached"]:
            # The forget set already looks unseen (e.g. examples the model never fit): there is
            # nothing to undo, so no statistics, selection or update.
            data.report_warnings.append(f"the forget set already looks unseen ({target_summary(target)['criterion']}):"
                                        " no update")
            losses = Measurements(forget_before, forget_before, target=target_mean(target))
            stopping = dict(target_summary(target), checks=[{k: v for k, v in first_check.items() if k not in ("reached", "mismatched")}],
                            stop_reason="the forget set already looked unseen: no step")
            return build_report(tuner, adapter_name, method, data, result=None,
                                outcome=UpdateOutcome(stopped_early=True, diagnostics={"stopping": stopping}),
                                losses=losses)
    retain_before = None
    if selection is None:
        if retain_statistics is not None:
            retain_statistics = retain_statistics.without({fingerprint(e) for e in data.forget_examples})
        statistics = mask_statistics(tuner, data, config.objective, retain_statistics)
        result = mask_search(tuner, adapter_name, data, statistics)
        forget_before = statistics.forget_loss if forget_before is None else forget_before
        retain_before = statistics.retain_loss
    elif allocated_selection(selection):
        result = fixed_selection(tuner, adapter_name, config.selection)
    else:
        result = fixed_selection(tuner, adapter_name, selection, seed=data.options.seed)
    with data.timer.phase("evaluation"):
        if forget_before is None:
            forget_before = data.mean_loss(data.forget_eval_loader)
        if retain_before is None and data.report_loader is not None:
            retain_before = data.mean_loss(data.report_loader)
    if not allocated_selection(selection):
        apply_selection(tuner, adapter_name, result, data)
    outcome = update(tuner, adapter_name, method, data, target=target, full_parameter=selection == "all",
                     initial_check=first_check, warn_without_target=not holdout_mismatched)
    forget_after, retain_after = measure(data)
    losses = Measurements(forget_before, forget_after, retain_before, retain_after, target_mean(target))
    return build_report(tuner, adapter_name, method, data, result=result, outcome=outcome, losses=losses)
