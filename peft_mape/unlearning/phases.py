"""The phases of one unlearning request, callable on their own.

    prepare (``preparation.py``) -> statistics -> search -> apply selection -> update -> measure

:func:`peft_mape.unlearning.unlearn.unlearn` composes them. Callers that reuse a phase's result
call the phases directly: successive memory-aided requests feed cached retain statistics to
:func:`mask_statistics`; a caller can run one :func:`mask_search` and then several updates from
the same original. Every phase reads the request's :class:`UnlearningData` and adds its seconds to
the data's phase timer.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..common.distributed import whole
from ..common.loop import optimise
from ..tuner.architectures import selected_units, unit_param_counts
from .methods.base import ClosedFormContext, ClosedFormMethod, LoopMethod, UnlearningMethod
from .preparation import REPORT_RETAIN, UnlearningData
from .report import UnlearnReport
from .search import SearchResult, random_selection, search_units
from .statistics import RetainStatistics, mask_gradients


@dataclass
class MaskStatistics:
    """The statistics pass: per-example mask gradients of both sets, and the sets' mean losses
    at the weights the pass saw (``retain_loss`` on the report's retain prefix)."""

    forget_per_example: dict
    retain_per_example: Optional[dict]
    forget_loss: float
    retain_loss: Optional[float]


@dataclass
class UpdateOutcome:
    """What the update phase did: steps, whether it stopped on the target, method diagnostics."""

    steps: int = 0
    stopped_early: bool = False
    lr: Optional[float] = None
    diagnostics: dict = field(default_factory=dict)


def allocated_selection(selection) -> bool:
    """Whether ``unlearn(selection=...)`` asks to update the deltas the adapter already holds."""
    return isinstance(selection, str) and selection == "allocated"


def adapter_to_fill(tuner, adapter_name: Optional[str], *, allocated: bool = False) -> str:
    """The adapter a request writes into: ``adapter_name`` or the single active adapter; it must be
    empty (``allocated``: hold a selection whose deltas are all zero) and no adapter may be merged."""
    if adapter_name is not None:
        if adapter_name not in tuner.peft_config:
            raise ValueError(f"unknown adapter '{adapter_name}'; known: {sorted(tuner.peft_config)}")
        name = adapter_name
    else:
        active = tuner.active_adapters
        if len(active) != 1:
            raise ValueError(f"several adapters are active ({active}); pass adapter_name=...")
        name = active[0]
    if allocated:
        params = tuner.adapter_parameters(name)
        if not tuner.peft_config[name].selection or not params:
            raise ValueError(f"selection='allocated': adapter '{name}' holds no selection; create it with "
                             "MAPEConfig(selection=...) (e.g. from select_units())")
        with torch.no_grad():
            if any(float(whole(p).abs().max()) != 0 for p in params):
                raise ValueError(f"selection='allocated': adapter '{name}' holds non-zero deltas (a finished "
                                 "request); allocate a fresh adapter with MAPEConfig(selection=...)")
    elif tuner.peft_config[name].selection:
        raise ValueError(
            f"adapter '{name}' already holds an unlearning request; add a new adapter for the next one: "
            f"model.add_adapter('request-2', MAPEConfig(...)); model.set_adapter('request-2')"
        )
    if any(layer.merged for _, layer in tuner.mape_layers()):
        raise ValueError("unmerge the adapters before unlearning (model.unmerge_adapter())")
    return name


@contextlib.contextmanager
def request_scope(tuner, adapter_name: str, overrides: dict, fold_other_adapters: bool = True, *,
                  allocated: bool = False):
    """Apply per-call config overrides (validated like the config fields) and fold the other
    active adapters while the request runs; on any exception drop the adapter's deltas and
    restore the config, so the model is as it was (base weights and other adapters are never
    written)."""
    config = tuner.peft_config[adapter_name]
    previous = {key: getattr(config, key) for key in overrides}
    try:
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        config.validate()
        config.sparsity = float(config.sparsity)
        others = [a for a in tuner.active_adapters if a != adapter_name] if fold_other_adapters else []
        with tuner.folded(others):
            yield config
    except BaseException:
        if allocated:  # zeroed in place: the shapes (and any sharding of them) stay as they were
            with torch.no_grad():
                for param in tuner.adapter_parameters(adapter_name):
                    param.zero_()
        else:
            tuner.apply_selection(adapter_name, None)
        for key, value in previous.items():
            setattr(config, key, value)
        raise


def mask_statistics(tuner, data: UnlearningData, objective: str,
                    retain_statistics: Optional[RetainStatistics] = None) -> MaskStatistics:
    """One pass over each set with unit gates: per-example mask gradients (SPEC §2).

    ``retain_statistics`` (cached at the original weights, rows of removed examples already
    dropped) replaces the retain pass; NORM needs no retain side at all.
    """
    with data.timer.phase("statistics"):
        forget = mask_gradients(tuner, data.forget_loader, data.loss_fn, device=data.device,
                                desc="forget statistics", progress=data.progress)
        retain_grads, retain_loss = None, None
        if objective == "norm":
            pass  # NORM ranks by the forget gradient alone
        elif retain_statistics is not None:
            retain_grads = retain_statistics.per_example
            retain_loss = float(retain_statistics.losses[:REPORT_RETAIN].mean()) if len(retain_statistics) else None
            data.report_warnings.append(f"mask search used cached retain statistics ({len(retain_statistics)} examples)")
        elif data.retain_loader is not None:
            retain = mask_gradients(tuner, data.retain_loader, data.loss_fn, device=data.device,
                                    desc="retain statistics", progress=data.progress)
            retain_grads, retain_loss = retain.per_example, float(retain.losses[:REPORT_RETAIN].mean())
        else:
            data.report_warnings.append("no retain set: the mask search ranks units by the forget gradient alone")
            retain_grads = {k: torch.zeros(1, *v.shape[1:]) for k, v in forget.per_example.items()}
    return MaskStatistics(forget.per_example, retain_grads, float(forget.losses.mean()), retain_loss)


def _unit_params(tuner, adapter_name: str) -> dict:
    config = tuner.peft_config[adapter_name]
    return unit_param_counts(tuner.architecture(adapter_name), dict(tuner.model.named_modules()),
                             config.update_scope)


def mask_search(tuner, adapter_name: str, data: UnlearningData, statistics: MaskStatistics) -> SearchResult:
    """Rank the units by the config's objective and pick the budget (SPEC §3)."""
    config = tuner.peft_config[adapter_name]
    with data.timer.phase("search"):
        return search_units(
            statistics.forget_per_example, statistics.retain_per_example, sparsity=config.sparsity,
            units=config.units, accounting=config.sparsity_accounting, rounds=int(config.rearrangement_rounds),
            unit_params=_unit_params(tuner, adapter_name), objective=config.objective,
        )


def fixed_selection(tuner, adapter_name: str, selection, seed: int = 0) -> SearchResult:
    """A SearchResult without a search: ``"all"`` (every head and filter: the full-parameter
    baseline), ``"random"`` (random units at the config's budget) or a dict of units per layer."""
    arch, config = tuner.architecture(adapter_name), tuner.peft_config[adapter_name]
    shapes = {"heads": (arch.num_layers, arch.num_heads), "filters": (arch.num_layers, arch.num_filters)}
    if selection == "all":
        masks = {k: torch.ones(s, dtype=torch.bool) for k, s in shapes.items()}
    elif selection == "random":
        return random_selection(shapes, config.sparsity, units=config.units, accounting=config.sparsity_accounting,
                                unit_params=_unit_params(tuner, adapter_name), seed=seed)
    elif isinstance(selection, dict):
        masks = {k: torch.zeros(s, dtype=torch.bool) for k, s in shapes.items()}
        for kind in masks:
            for layer, indices in selected_units(selection, kind, *shapes[kind]).items():
                masks[kind][layer, indices] = True
    else:
        raise ValueError(f"selection must be 'all', 'random' or a dict of heads/filters per layer, got {selection!r}")
    return SearchResult(masks=masks, scores={})


def apply_selection(tuner, adapter_name: str, result: SearchResult, data: UnlearningData) -> list:
    """Allocate zero deltas over the units ``result`` selects; returns them (the trainable parameters)."""
    with data.timer.phase("search"):
        tuner.apply_selection(adapter_name, result.selection())
        return tuner.adapter_parameters(adapter_name)


def train_size(data: UnlearningData, method: ClosedFormMethod) -> int:
    """n of the closed-form 1/n scale: the method's ``num_train_examples``, else |forget| + |retain|."""
    if method.num_train_examples is not None:
        return method.num_train_examples
    estimate = len(data.forget_examples) + data.retain_source_size
    data.report_warnings.append(f"num_train_examples not given; estimated as |forget| + |retain| = {estimate}")
    return estimate


def update(tuner, adapter_name: str, method: UnlearningMethod, data: UnlearningData, *,
           target=None, full_parameter: bool = False, initial_check: Optional[dict] = None,
           warn_without_target: bool = True) -> UpdateOutcome:
    """Change the selected deltas with ``method``: its closed-form step, or the optimisation loop
    (stopped at ``target``, a :class:`peft_mape.common.stopping.HoldoutTarget` or a mean forget
    loss; ``initial_check`` is its first check when already made). ``warn_without_target=False``
    when the caller has already said why there is no target."""
    params = tuner.adapter_parameters(adapter_name)
    with data.timer.phase("update"):
        if isinstance(method, ClosedFormMethod):
            context = ClosedFormContext(tuner=tuner, adapter_name=adapter_name, params=params, data=data,
                                        num_train_examples=train_size(data, method), target=target)
            step = method.step(context)
            data.report_warnings.extend(step.report_warnings)
            return UpdateOutcome(steps=step.steps, diagnostics=dict(step.diagnostics,
                                                                    num_train_examples=context.num_train_examples))
        if not isinstance(method, LoopMethod):
            raise TypeError(f"method must be a LoopMethod or a ClosedFormMethod, got {type(method).__name__}")
        if target is None and warn_without_target:
            data.report_warnings.append("no holdout/forget_loss_target: nothing says when the forget set looks unseen, "
                                        "so the update ran at a fixed step size until the step budget or the "
                                        "retain-loss budget ended it (pass holdout=: held-out examples of the forget "
                                        "set's kind)")
        lr = method.step_size(full_parameter)
        loop = optimise(tuner.model, params, method, data.loop_data(), lr=lr, target=target,
                        initial_check=initial_check, reference=lambda: tuner.muted([adapter_name]))
        data.report_warnings.extend(loop.warnings)
        return UpdateOutcome(steps=loop.steps, stopped_early=loop.stopped_early, lr=lr,
                             diagnostics={"forget_loss_trace": loop.forget_loss_trace, "stopping": loop.stopping(target)})


def measure(data: UnlearningData) -> tuple[float, Optional[float]]:
    """Mean forget loss and mean loss of the report's retain prefix at the current weights."""
    with data.timer.phase("evaluation"):
        forget = data.mean_loss(data.forget_eval_loader)
        retain = data.mean_loss(data.report_loader) if data.report_loader is not None else None
    return forget, retain


@dataclass
class Measurements:
    """Losses before and after the update, and the stopping target the update used."""

    forget_before: float
    forget_after: float
    retain_before: Optional[float] = None
    retain_after: Optional[float] = None
    target: Optional[float] = None


def build_report(tuner, adapter_name: str, method: UnlearningMethod, data: UnlearningData, *,
                 result: Optional[SearchResult], outcome: UpdateOutcome, losses: Measurements) -> UnlearnReport:
    """The :class:`UnlearnReport` of a finished (or skipped: ``result=None``) request."""
    config = tuner.peft_config[adapter_name]
    params = tuner.adapter_parameters(adapter_name) if result is not None else []
    chosen = result.selection() if result is not None else {}
    counts = result.counts() if result is not None else {"heads": 0, "filters": 0}
    with torch.no_grad():
        update_norm = math.sqrt(sum(float(whole(p).double().pow(2).sum()) for p in params))
    hyperparameters = {"seed": data.options.seed, "batch_size": data.batch_size, "objective": config.objective,
                       **method.options()}
    if outcome.lr is not None:
        hyperparameters["lr"] = outcome.lr
    seconds = {phase: data.timer.seconds.get(phase, 0.0)
               for phase in ("data", "statistics", "search", "update", "evaluation")}
    return UnlearnReport(
        adapter_name=adapter_name, method=method.name, sparsity=config.sparsity, units=config.units,
        num_forget=len(data.forget_examples), num_retain=len(data.retain_examples),
        selected_heads=chosen.get("heads", {}), selected_filters=chosen.get("filters", {}),
        num_selected_heads=counts["heads"], num_selected_filters=counts["filters"],
        trainable_parameters=sum(p.numel() for p in params),
        scores={k: v.tolist() for k, v in result.scores.items()} if result is not None else {}, seconds=seconds,
        forget_loss_before=losses.forget_before, forget_loss_after=losses.forget_after,
        retain_loss_before=losses.retain_before, retain_loss_after=losses.retain_after, update_norm=update_norm,
        hyperparameters=hyperparameters, steps=outcome.steps, stopped_early=outcome.stopped_early,
        forget_loss_target=losses.target, warnings=data.report_warnings, diagnostics=outcome.diagnostics,
    )
