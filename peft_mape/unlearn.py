"""``unlearn()``: statistics -> mask search -> restricted update, with rollback on failure."""

from __future__ import annotations

import math
import time
import warnings
from typing import Optional

import torch

from .architectures import unit_param_counts
from .data import (
    drop_overlap, forward_arguments, make_loader, materialise, validate_examples,
)
from .report import UnlearnReport
from .search import SearchResult, search_units
from .statistics import mask_gradients, parameter_fisher_diagonal, parameter_gradient_sum
from .updates import GradDiff, GradientAscent, mean_loss, optimise, second_order_step

METHODS = ("so", "ga", "graddiff")
# Chosen by measurement on the tweets demo (see README, "Choosing the default"): GradDiff on the
# selected units, stopped when the forget loss reaches the held-out loss.
DEFAULT_METHOD = "graddiff"
# Adam on the selected units' deltas; the paper's masked range is 2e-4..3e-4 (1e-5 for
# full-parameter updates). 1e-3 cost ~17 test points in 5 steps on the tweets demo.
DEFAULT_LR = {"ga": 2e-4, "graddiff": 2e-4}
DEFAULT_MAX_STEPS = 100
REPORT_RETAIN = 256  # retain examples behind the report's before/after retain loss


def _adapter_name(tuner, adapter_name: Optional[str]) -> str:
    if adapter_name is not None:
        if adapter_name not in tuner.peft_config:
            raise ValueError(f"unknown adapter '{adapter_name}'; known: {sorted(tuner.peft_config)}")
        return adapter_name
    active = tuner.active_adapters
    if len(active) != 1:
        raise ValueError(f"several adapters are active ({active}); pass adapter_name=...")
    return active[0]




def unlearn(tuner, forget, retain=None, method: Optional[str] = None, *, num_train_examples: Optional[int] = None,
            sparsity: Optional[float] = None, units: Optional[str] = None, seed: int = 0, loss_fn=None,
            holdout=None, forget_loss_target: Optional[float] = None, batch_size: int = 16,
            lr: Optional[float] = None, max_steps: Optional[int] = None, retain_weight: float = 1.0,
            damping: float = 1e-3, so_scale: float = 1.0, adapter_name: Optional[str] = None,
            selection=None, progress: bool = True) -> UnlearnReport:
    """Erase the influence of ``forget`` into one MAPE adapter and return a report.

    Args:
        forget: the examples to erase (``datasets.Dataset``, torch Dataset of model-ready dicts,
            or a DataLoader of dict batches).
        retain: a sample of the remaining training data (capped at ``max_retain_examples``).
        method: "graddiff" (default), "ga" or "so".
        num_train_examples: size of the original training set (SO's eta = 1/n); estimated as
            |forget| + |retain| when omitted.
        sparsity, units: per-call overrides of the adapter config.
        holdout: data the model never trained on; the GA/GradDiff loop stops once the mean forget
            loss reaches the holdout's mean loss (the forget set then looks unseen).
        forget_loss_target: an explicit stopping target instead of ``holdout``.
        loss_fn: ``loss_fn(outputs, batch) -> tensor[batch]`` of per-example losses.
        selection: skip the mask search and update these units instead: ``"all"`` (every head
            and filter: the full-parameter baseline) or ``{"heads": {layer: [...]}, "filters": {...}}``.

    On any exception the adapter is restored to its previous (empty) state; base weights and
    other adapters are never written.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    name = _adapter_name(tuner, adapter_name)
    config = tuner.peft_config[name]
    method = method or DEFAULT_METHOD
    sparsity = config.sparsity if sparsity is None else sparsity
    units = config.units if units is None else units
    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; choose one of {list(METHODS)}")
    if config.selection:
        raise ValueError(
            f"adapter '{name}' already holds an unlearning request; add a new adapter for the next one: "
            f"model.add_adapter('request-2', MAPEConfig(...)); model.set_adapter('request-2')"
        )
    if any(layer.merged for _, layer in tuner.mape_layers()):
        raise ValueError("unmerge the adapters before unlearning (model.unmerge_adapter())")

    previous = {"sparsity": config.sparsity, "units": config.units}
    try:
        config.sparsity, config.units = sparsity, units
        config.validate()  # the per-call overrides obey the same rules as the config fields
        config.sparsity = float(sparsity)
        return _run(tuner, name, config, forget, retain, method, timings, clock, num_train_examples=num_train_examples,
                    seed=seed, loss_fn=loss_fn, holdout=holdout, forget_loss_target=forget_loss_target,
                    batch_size=batch_size, lr=lr, max_steps=max_steps, retain_weight=retain_weight,
                    damping=damping, so_scale=so_scale, selection=selection, progress=progress)
    except BaseException:
        # Nothing outside this adapter was written; dropping its deltas restores the model.
        tuner.apply_selection(name, None)
        config.sparsity, config.units = previous["sparsity"], previous["units"]
        raise


def _run(tuner, name, config, forget, retain, method, timings, clock, *, num_train_examples, seed, loss_fn, holdout,
         forget_loss_target, batch_size, lr, max_steps, retain_weight, damping, so_scale, selection, progress):
    model = tuner.model
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    notes: list[str] = []

    allowed = forward_arguments(model)
    forget_examples = materialise(forget, allowed, what="forget")
    validate_examples(forget_examples, "forget", needs_labels=loss_fn is None)
    cap = int(config.max_retain_examples)
    retain_examples = materialise(retain, allowed, limit=cap, seed=seed, what="retain")
    if retain_examples:
        validate_examples(retain_examples, "retain", needs_labels=loss_fn is None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            retain_examples = drop_overlap(retain_examples, forget_examples)
        for w in caught:
            notes.append(str(w.message))
            warnings.warn(w.message, UserWarning, stacklevel=4)
    if method in ("so", "graddiff") and not retain_examples:
        raise ValueError(f"method '{method}' needs a non-empty retain set")
    pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    forget_loader = make_loader(forget_examples, batch_size, pad)
    # Statistics read the retain sample in order; the optimisation loop draws shuffled batches.
    retain_loader = make_loader(retain_examples, batch_size, pad) if retain_examples else None
    train_loader = make_loader(retain_examples, batch_size, pad, shuffle=True, seed=seed) if retain_examples else None
    # The report's retain loss is measured on a fixed prefix of the (random) retain sample.
    report_loader = make_loader(retain_examples[:REPORT_RETAIN], batch_size, pad) if retain_examples else None
    timings["data"] = time.perf_counter() - clock

    target = forget_loss_target
    if method != "so" and target is None and holdout is not None:
        holdout_examples = materialise(holdout, allowed, limit=cap, seed=seed, what="holdout")
        validate_examples(holdout_examples, "holdout", needs_labels=loss_fn is None)
        target = mean_loss(model, make_loader(holdout_examples, batch_size, pad), loss_fn, device=device)
    forget_now = None
    if target is not None:
        clock = time.perf_counter()
        forget_now = mean_loss(model, forget_loader, loss_fn, device=device)
        timings["evaluation"] = timings.get("evaluation", 0.0) + time.perf_counter() - clock
        if forget_now >= target:
            # The forget set already looks unseen (e.g. mislabelled examples the model never fit):
            # there is nothing to undo, so no statistics, selection or update.
            notes.append(f"forget loss {forget_now:.4f} already >= target {target:.4f}: no update")
            return _no_update_report(name, method, config, forget_examples, retain_examples, timings, forget_now,
                                     target, notes)
    arch = tuner.architecture(name)
    if selection is None:
        result, forget_before, retain_before = _search(
            tuner, config, arch, forget_loader, retain_loader, loss_fn, device, progress, notes, timings
        )
        timings.setdefault("evaluation", 0.0)
    else:
        result = fixed_selection(arch, selection)
        timings["statistics"] = 0.0
        clock = time.perf_counter()
        forget_before = mean_loss(model, forget_loader, loss_fn, device=device)
        retain_before = mean_loss(model, report_loader, loss_fn, device=device) if report_loader else None
        timings["evaluation"] = timings.get("evaluation", 0.0) + time.perf_counter() - clock
    selection = result.selection()
    clock = time.perf_counter()
    tuner.apply_selection(name, selection)
    params = tuner.adapter_parameters(name)
    timings["search"] = timings.get("search", 0.0) + time.perf_counter() - clock

    clock = time.perf_counter()
    hyper: dict = {"seed": seed, "batch_size": batch_size}
    steps, stopped_early = 0, False
    if method == "so":
        n_train = num_train_examples or _estimate_train_size(forget_examples, retain, retain_examples, notes)
        grad_sum = parameter_gradient_sum(tuner, name, forget_loader, loss_fn, device=device, progress=progress)
        fisher = parameter_fisher_diagonal(tuner, name, retain_loader, loss_fn, device=device, progress=progress)
        second_order_step(params, grad_sum, fisher, num_train_examples=n_train, damping=damping, scale=so_scale)
        hyper.update(num_train_examples=n_train, damping=damping, so_scale=so_scale)
    else:
        update_loss = GradientAscent() if method == "ga" else GradDiff(retain_weight=retain_weight)
        if target is None:
            notes.append("no holdout/forget_loss_target: ran the full step budget without early stopping")
        lr = DEFAULT_LR[method] if lr is None else lr
        max_steps = DEFAULT_MAX_STEPS if max_steps is None else max_steps
        loop = optimise(model, params, update_loss, forget_loader, train_loader, device=device, loss_fn=loss_fn,
                        lr=lr, max_steps=max_steps, forget_loss_target=target, progress=progress,
                        initial_forget_loss=forget_now)
        steps, stopped_early = loop.steps, loop.stopped_early
        hyper.update(lr=lr, max_steps=max_steps, retain_weight=retain_weight if method == "graddiff" else None)
    timings["update"] = time.perf_counter() - clock

    clock = time.perf_counter()
    forget_after = mean_loss(model, forget_loader, loss_fn, device=device)
    retain_after = mean_loss(model, report_loader, loss_fn, device=device) if report_loader else None
    timings["evaluation"] += time.perf_counter() - clock
    with torch.no_grad():
        update_norm = math.sqrt(sum(float(p.double().pow(2).sum()) for p in params))
    counts = result.counts()
    return UnlearnReport(
        adapter_name=name, method=method, sparsity=config.sparsity, units=config.units,
        num_forget=len(forget_examples), num_retain=len(retain_examples),
        selected_heads=selection.get("heads", {}), selected_filters=selection.get("filters", {}),
        num_selected_heads=counts["heads"], num_selected_filters=counts["filters"],
        trainable_parameters=sum(p.numel() for p in params),
        scores={k: v.tolist() for k, v in result.scores.items()}, seconds=timings,
        forget_loss_before=forget_before, forget_loss_after=forget_after,
        retain_loss_before=retain_before, retain_loss_after=retain_after, update_norm=update_norm,
        hyperparameters=hyper, steps=steps, stopped_early=stopped_early, forget_loss_target=target, warnings=notes,
    )


def _search(tuner, config, arch, forget_loader, retain_loader, loss_fn, device, progress, notes, timings):
    """Statistics pass and MLR search; returns (result, forget loss, retain loss) and fills timings."""
    clock = time.perf_counter()
    forget_grads = mask_gradients(tuner, forget_loader, loss_fn, device=device, desc="forget statistics",
                                  progress=progress)
    retain_before = None
    if retain_loader is not None:
        retain_stats = mask_gradients(tuner, retain_loader, loss_fn, device=device, desc="retain statistics",
                                      progress=progress)
        retain_grads = retain_stats.per_example
        retain_before = float(retain_stats.losses[:REPORT_RETAIN].mean())
    else:
        notes.append("no retain set: the mask search ranks units by the forget gradient alone")
        retain_grads = {k: torch.zeros(1, *v.shape) for k, v in forget_grads.total().items()}
    timings["statistics"] = time.perf_counter() - clock
    clock = time.perf_counter()
    result = search_units(
        forget_grads.total(), retain_grads, sparsity=config.sparsity, units=config.units,
        accounting=config.sparsity_accounting, rounds=int(config.rearrangement_rounds),
        unit_params=unit_param_counts(arch, dict(tuner.model.named_modules()), config.update_scope),
    )
    timings["search"] = time.perf_counter() - clock
    return result, float(forget_grads.losses.mean()), retain_before


def fixed_selection(arch, selection) -> SearchResult:
    """A SearchResult for a user-given selection (``"all"`` or a selection dict); no scores."""
    shapes = {"heads": (arch.num_layers, arch.num_heads), "filters": (arch.num_layers, arch.num_filters)}
    if selection == "all":
        masks = {k: torch.ones(s, dtype=torch.bool) for k, s in shapes.items()}
    elif isinstance(selection, dict):
        masks = {k: torch.zeros(s, dtype=torch.bool) for k, s in shapes.items()}
        for kind in masks:
            for layer, indices in (selection.get(kind) or {}).items():
                masks[kind][int(layer), list(indices)] = True
    else:
        raise ValueError(f"selection must be 'all' or a dict of heads/filters per layer, got {selection!r}")
    return SearchResult(masks=masks, scores={})


def _no_update_report(name, method, config, forget_examples, retain_examples, timings, forget_loss, target, notes):
    for phase in ("statistics", "search", "update"):
        timings.setdefault(phase, 0.0)
    return UnlearnReport(
        adapter_name=name, method=method, sparsity=config.sparsity, units=config.units,
        num_forget=len(forget_examples), num_retain=len(retain_examples), selected_heads={}, selected_filters={},
        num_selected_heads=0, num_selected_filters=0, trainable_parameters=0, scores={}, seconds=timings,
        forget_loss_before=forget_loss, forget_loss_after=forget_loss, retain_loss_before=None,
        retain_loss_after=None, update_norm=0.0, stopped_early=True, forget_loss_target=target, warnings=notes,
    )


def _estimate_train_size(forget_examples, retain_source, retain_examples, notes) -> int:
    source = getattr(retain_source, "dataset", retain_source)  # a DataLoader's len() counts batches
    retain_size = len(source) if hasattr(source, "__len__") else len(retain_examples)
    estimate = len(forget_examples) + retain_size
    notes.append(f"num_train_examples not given; estimated as |forget| + |retain| = {estimate}")
    return estimate
