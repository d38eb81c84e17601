"""``unlearn()``: statistics -> mask search -> restricted update, with rollback on failure."""

from __future__ import annotations

import math
import time
import warnings
from typing import Iterable, Optional

import torch

from .architectures import selected_units, unit_param_counts
from .data import (
    MIN_EVAL_BATCH_SIZE, drop_overlap, fingerprint, forward_arguments, make_eval_loader, make_loader, materialise,
    validate_examples,
)
from .influence import influence_step, solve_damped_system
from .report import UnlearnReport
from .search import SearchResult, random_selection, search_units
from .statistics import RetainStatistics, mask_gradients, parameter_fisher_diagonal, parameter_gradient_sum
from .updates import NPO, GradDiff, GradientAscent, WithRetainKL, mean_loss, optimise, second_order_step

METHODS = ("so", "ga", "graddiff", "npo", "influence")
CLOSED_FORM_METHODS = ("so", "influence")
# Chosen by measurement on the tweets demo (see README, "Choosing the default"): GradDiff on the
# selected units, stopped when the forget loss reaches the held-out loss.
DEFAULT_METHOD = "graddiff"
# Adam on the selected units' deltas. The paper's masked range is 2e-4..3e-4; full-parameter
# updates (selection="all") need a smaller step, 1e-5 (paper and open-unlearning). 1e-3 on the
# selected units cost ~17 test points in 5 steps on the tweets demo.
DEFAULT_LR = {"ga": 2e-4, "graddiff": 2e-4, "npo": 2e-4}
FULL_PARAMETER_LR = 1e-5
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
            sparsity: Optional[float] = None, units: Optional[str] = None, objective: Optional[str] = None,
            seed: int = 0, loss_fn=None, holdout=None, forget_loss_target: Optional[float] = None,
            batch_size: int = 16, eval_batch_size: Optional[int] = None, lr: Optional[float] = None,
            max_steps: Optional[int] = None, forget_loss_before: Optional[float] = None,
            retain_weight: float = 1.0, npo_beta: float = 0.1, kl_weight: float = 0.0, damping: float = 1e-3,
            so_scale: float = 1.0, hessian_damping: float = 1.0, solver: str = "cg",
            solver_steps: Optional[int] = None, hessian_examples: int = 256,
            retain_statistics: Optional[RetainStatistics] = None, exclude_from_retain: Iterable[str] = (),
            adapter_name: Optional[str] = None, selection=None, fold_other_adapters: bool = True,
            progress: bool = True) -> UnlearnReport:
    """Erase the influence of ``forget`` into one MAPE adapter and return a report.

    Args:
        forget: the examples to erase (``datasets.Dataset``, torch Dataset of model-ready dicts,
            or a DataLoader of dict batches). For causal LMs, label prompt tokens -100 so the
            loss covers the answer only (``peft_mape.causal_lm`` builds such examples).
        retain: a sample of the remaining training data (capped at ``max_retain_examples``).
        method: the update rule on the selected units (SPEC §4):
            - "graddiff" (default): ascent on the forget loss + ``retain_weight`` x descent on retain;
            - "ga": gradient ascent on the forget loss;
            - "npo": negative preference optimisation against the model without this adapter
              (``npo_beta``), plus ``retain_weight`` x the retain loss (0 disables it);
            - "so": one closed-form step eta (F_r + lambda)^-1 sum grad, F_r the diagonal retain Fisher;
            - "influence": (1/n) (H + ``hessian_damping`` I)^-1 sum grad with Hessian-vector
              products on ``hessian_examples`` retain examples, ``solver`` "cg" or "adam".
              The retain Hessian of a fine-tuned network is indefinite: lambda = 1e-2 left CG at a
              relative residual of 10 on SmolLM2/TOFU and 0.1 met negative curvature on a tiny LM,
              hence the default 1.0; ``report.diagnostics`` says when it is still too small.
            GA/GradDiff/NPO run Adam for at most ``max_steps`` (100) steps at ``lr``: default 2e-4
            on the selected units, 1e-5 with ``selection="all"`` (full-parameter updates).
        num_train_examples: size of the original training set (SO/influence scale 1/n); estimated
            as |forget| + |retain| when omitted.
        sparsity, units, objective: per-call overrides of the adapter config ("mlr", "mlf", "norm").
        holdout: data the model never trained on; GA/GradDiff/NPO stop once the mean forget loss
            reaches the holdout's mean loss (the forget set then looks unseen).
        forget_loss_target: an explicit stopping target instead of ``holdout``.
        batch_size: examples per statistics batch and per update step.
        eval_batch_size: examples per batch of the no-grad loss passes (report losses, stopping
            checks, holdout target); default ``max(batch_size, 32)``.
        forget_loss_before: the mean forget loss at the current weights when the caller has
            already measured it (e.g. several methods run from one original): skips that pass.
            Trusted as given; it is reported and is the first early-stopping check.
        kl_weight: add ``kl_weight`` x KL(original || current) on retain batches (loop methods).
        loss_fn: ``loss_fn(outputs, batch) -> tensor[batch]`` of per-example losses.
        retain_statistics: cached retain-side mask statistics at the original weights (see
            ``precompute_retain_statistics``); rows of forget/excluded examples are dropped.
        exclude_from_retain: fingerprints of examples removed by earlier requests.
        selection: skip the mask search and update these units instead: ``"all"`` (every head
            and filter: the full-parameter baseline), ``"random"`` (random units at the same
            budget) or ``{"heads": {layer: [...]}, "filters": {...}}``.
        fold_other_adapters: while this call runs, apply the other active adapters (earlier
            requests) through one precomputed weight per layer, so a request costs the same
            however many came before; costs one copy of the affected fp32 projection weights.

    On any exception the adapter is restored to its previous (empty) state; base weights and
    other adapters are never written.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    name = _adapter_name(tuner, adapter_name)
    config = tuner.peft_config[name]
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise ValueError(f"unknown unlearning method {method!r}; choose one of {list(METHODS)}")
    if kl_weight < 0 or (kl_weight > 0 and method in CLOSED_FORM_METHODS):
        raise ValueError(f"kl_weight must be >= 0 and applies to ga/graddiff/npo only, got {kl_weight} for '{method}'")
    if forget_loss_before is not None and not math.isfinite(forget_loss_before):
        raise ValueError(f"forget_loss_before must be a finite number, got {forget_loss_before}")
    if config.selection:
        raise ValueError(
            f"adapter '{name}' already holds an unlearning request; add a new adapter for the next one: "
            f"model.add_adapter('request-2', MAPEConfig(...)); model.set_adapter('request-2')"
        )
    if any(layer.merged for _, layer in tuner.mape_layers()):
        raise ValueError("unmerge the adapters before unlearning (model.unmerge_adapter())")

    overrides = {"sparsity": sparsity, "units": units, "objective": objective}
    previous = {key: getattr(config, key) for key in overrides}
    try:
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        config.validate()  # the per-call overrides obey the same rules as the config fields
        config.sparsity = float(config.sparsity)
        others = [a for a in tuner.active_adapters if a != name] if fold_other_adapters else []
        with tuner.folded(others):
            return _run(tuner, name, config, forget, retain, method, timings, clock,
                        num_train_examples=num_train_examples, seed=seed, loss_fn=loss_fn, holdout=holdout,
                        forget_loss_target=forget_loss_target, batch_size=batch_size,
                        eval_batch_size=eval_batch_size, lr=lr, max_steps=max_steps,
                        forget_loss_before=forget_loss_before, retain_weight=retain_weight, npo_beta=npo_beta,
                        kl_weight=kl_weight, damping=damping, so_scale=so_scale, hessian_damping=hessian_damping,
                        solver=solver, solver_steps=solver_steps, hessian_examples=hessian_examples,
                        retain_statistics=retain_statistics, exclude_from_retain=set(exclude_from_retain),
                        selection=selection, progress=progress)
    except BaseException:
        # Nothing outside this adapter was written; dropping its deltas restores the model.
        tuner.apply_selection(name, None)
        for key, value in previous.items():
            setattr(config, key, value)
        raise


def prepare_examples(tuner, config, forget, retain, *, loss_fn=None, seed: int = 0, exclude: Iterable[str] = (),
                     notes: Optional[list] = None):
    """Materialise and validate the forget set and the (capped, de-duplicated) retain sample."""
    notes = [] if notes is None else notes
    allowed = forward_arguments(tuner.model)
    forget_examples = materialise(forget, allowed, what="forget") if forget is not None else []
    if forget is not None:
        validate_examples(forget_examples, "forget", needs_labels=loss_fn is None, model=tuner.model)
    retain_examples = materialise(retain, allowed, limit=int(config.max_retain_examples), seed=seed, what="retain")
    if retain_examples:
        validate_examples(retain_examples, "retain", needs_labels=loss_fn is None, model=tuner.model)
        exclude = set(exclude)
        if exclude:
            before = len(retain_examples)
            retain_examples = [e for e in retain_examples if fingerprint(e) not in exclude]
            if len(retain_examples) != before:
                notes.append(f"{before - len(retain_examples)} retain example(s) removed by earlier requests were left out")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            retain_examples = drop_overlap(retain_examples, forget_examples)
        for w in caught:
            notes.append(str(w.message))
            warnings.warn(w.message, UserWarning, stacklevel=4)
    return forget_examples, retain_examples


def _run(tuner, name, config, forget, retain, method, timings, clock, *, num_train_examples, seed, loss_fn, holdout,
         forget_loss_target, batch_size, eval_batch_size, lr, max_steps, forget_loss_before, retain_weight, npo_beta,
         kl_weight, damping, so_scale, hessian_damping, solver, solver_steps, hessian_examples, retain_statistics,
         exclude_from_retain, selection, progress):
    model = tuner.model
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    notes: list[str] = []

    forget_examples, retain_examples = prepare_examples(
        tuner, config, forget, retain, loss_fn=loss_fn, seed=seed, exclude=exclude_from_retain, notes=notes
    )
    needs_retain = method in ("so", "graddiff", "influence") or kl_weight > 0 or (method == "npo" and retain_weight > 0)
    if needs_retain and not retain_examples:
        raise ValueError(f"method '{method}' needs a non-empty retain set"
                         + (" (or pass retain_weight=0 for NPO without a retain term)" if method == "npo" else ""))
    if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
        raise ValueError(f"batch_size and eval_batch_size must be >= 1, got {batch_size} and {eval_batch_size}")
    eval_batch_size = eval_batch_size or max(batch_size, MIN_EVAL_BATCH_SIZE)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    forget_loader = make_loader(forget_examples, batch_size, pad)
    forget_eval_loader = make_eval_loader(forget_examples, eval_batch_size, pad)
    # Statistics read the retain sample in order; the optimisation loop draws shuffled batches.
    retain_loader = make_loader(retain_examples, batch_size, pad) if retain_examples else None
    train_loader = make_loader(retain_examples, batch_size, pad, shuffle=True, seed=seed) if retain_examples else None
    # The report's retain loss is measured on a fixed prefix of the (random) retain sample.
    report_loader = make_eval_loader(retain_examples[:REPORT_RETAIN], eval_batch_size, pad) if retain_examples else None
    timings["data"] = time.perf_counter() - clock

    target = forget_loss_target
    if method not in CLOSED_FORM_METHODS and target is None and holdout is not None:
        holdout_examples = materialise(holdout, forward_arguments(model), limit=int(config.max_retain_examples),
                                       seed=seed, what="holdout")
        validate_examples(holdout_examples, "holdout", needs_labels=loss_fn is None, model=model)
        target = mean_loss(model, make_eval_loader(holdout_examples, eval_batch_size, pad), loss_fn, device=device)
    forget_now = forget_loss_before
    if target is not None and forget_now is None:
        clock = time.perf_counter()
        forget_now = mean_loss(model, forget_eval_loader, loss_fn, device=device)
        timings["evaluation"] = timings.get("evaluation", 0.0) + time.perf_counter() - clock
    if target is not None:
        if forget_now >= target:
            # The forget set already looks unseen (e.g. mislabelled examples the model never fit):
            # there is nothing to undo, so no statistics, selection or update.
            notes.append(f"forget loss {forget_now:.4f} already >= target {target:.4f}: no update")
            return _no_update_report(name, method, config, forget_examples, retain_examples, timings, forget_now,
                                     target, notes)
    arch = tuner.architecture(name)
    unit_params = unit_param_counts(arch, dict(model.named_modules()), config.update_scope)
    timings.setdefault("evaluation", 0.0)
    forget_before, retain_before = forget_now, None
    if selection is None:
        if retain_statistics is not None:
            removed = exclude_from_retain | {fingerprint(e) for e in forget_examples}
            retain_statistics = retain_statistics.without(removed)
            notes.append(f"mask search used cached retain statistics ({len(retain_statistics)} examples)")
        result, searched_forget_loss, retain_before = _search(
            tuner, config, forget_loader, retain_loader, retain_statistics, unit_params, loss_fn, device, progress,
            notes, timings,
        )
        forget_before = searched_forget_loss if forget_before is None else forget_before
    else:
        timings["statistics"] = 0.0
        result = fixed_selection(arch, selection, config=config, unit_params=unit_params, seed=seed)
    clock = time.perf_counter()
    if forget_before is None:
        forget_before = mean_loss(model, forget_eval_loader, loss_fn, device=device)
    if retain_before is None and report_loader is not None:
        retain_before = mean_loss(model, report_loader, loss_fn, device=device)
    timings["evaluation"] += time.perf_counter() - clock
    chosen = result.selection()
    clock = time.perf_counter()
    tuner.apply_selection(name, chosen)
    params = tuner.adapter_parameters(name)
    timings["search"] = timings.get("search", 0.0) + time.perf_counter() - clock

    clock = time.perf_counter()
    hyper: dict = {"seed": seed, "batch_size": batch_size, "objective": config.objective}
    diagnostics: dict = {}
    steps, stopped_early = 0, False
    if method in CLOSED_FORM_METHODS:
        n_train = num_train_examples or _estimate_train_size(forget_examples, retain, retain_examples, notes)
        grad_sum = parameter_gradient_sum(tuner, name, forget_loader, loss_fn, device=device, progress=progress)
        if method == "so":
            fisher = parameter_fisher_diagonal(tuner, name, retain_loader, loss_fn, device=device, progress=progress)
            second_order_step(params, grad_sum, fisher, num_train_examples=n_train, damping=damping, scale=so_scale)
            hyper.update(num_train_examples=n_train, damping=damping, so_scale=so_scale)
        else:
            hessian_loader = make_loader(retain_examples[:hessian_examples], batch_size, pad)
            solution = solve_damped_system(model, params, grad_sum, hessian_loader, loss_fn, device=device,
                                           damping=hessian_damping, solver=solver, steps=solver_steps,
                                           progress=progress)
            influence_step(params, solution.solution, num_train_examples=n_train)
            steps = solution.iterations
            hyper.update(num_train_examples=n_train, hessian_damping=hessian_damping, solver=solver,
                         solver_steps=solver_steps, hessian_examples=min(hessian_examples, len(retain_examples)))
            diagnostics.update(relative_residual=solution.relative_residual,
                               negative_curvature=solution.negative_curvature)
            if solution.negative_curvature:
                notes.append("influence CG stopped at a direction of negative curvature; raise hessian_damping")
    else:
        update_loss = _loop_loss(method, retain_weight=retain_weight, npo_beta=npo_beta, kl_weight=kl_weight)
        if target is None:
            notes.append("no holdout/forget_loss_target: ran the full step budget without early stopping")
        if lr is None:
            lr = FULL_PARAMETER_LR if selection == "all" else DEFAULT_LR[method]
        max_steps = DEFAULT_MAX_STEPS if max_steps is None else max_steps
        loop = optimise(model, params, update_loss, forget_loader, train_loader, device=device, loss_fn=loss_fn,
                        lr=lr, max_steps=max_steps, forget_loss_target=target, progress=progress,
                        initial_forget_loss=forget_before, reference=lambda: tuner.muted([name]),
                        check_loader=forget_eval_loader)
        steps, stopped_early = loop.steps, loop.stopped_early
        hyper.update(lr=lr, max_steps=max_steps, kl_weight=kl_weight,
                     retain_weight=retain_weight if update_loss.needs_retain else None,
                     npo_beta=npo_beta if method == "npo" else None)
        diagnostics["forget_loss_trace"] = loop.forget_loss_trace
    timings["update"] = time.perf_counter() - clock

    clock = time.perf_counter()
    forget_after = mean_loss(model, forget_eval_loader, loss_fn, device=device)
    retain_after = mean_loss(model, report_loader, loss_fn, device=device) if report_loader else None
    timings["evaluation"] += time.perf_counter() - clock
    with torch.no_grad():
        update_norm = math.sqrt(sum(float(p.double().pow(2).sum()) for p in params))
    counts = result.counts()
    return UnlearnReport(
        adapter_name=name, method=method, sparsity=config.sparsity, units=config.units,
        num_forget=len(forget_examples), num_retain=len(retain_examples),
        selected_heads=chosen.get("heads", {}), selected_filters=chosen.get("filters", {}),
        num_selected_heads=counts["heads"], num_selected_filters=counts["filters"],
        trainable_parameters=sum(p.numel() for p in params),
        scores={k: v.tolist() for k, v in result.scores.items()}, seconds=timings,
        forget_loss_before=forget_before, forget_loss_after=forget_after,
        retain_loss_before=retain_before, retain_loss_after=retain_after, update_norm=update_norm,
        hyperparameters=hyper, steps=steps, stopped_early=stopped_early, forget_loss_target=target, warnings=notes,
        diagnostics=diagnostics,
    )


def _loop_loss(method: str, *, retain_weight: float, npo_beta: float, kl_weight: float):
    """The UpdateLoss of an optimisation-loop method, with the optional KL retain term."""
    if method == "ga":
        loss = GradientAscent()
    elif method == "graddiff":
        loss = GradDiff(retain_weight=retain_weight)
    else:
        loss = NPO(beta=npo_beta, retain_weight=retain_weight)
    return WithRetainKL(loss, kl_weight) if kl_weight > 0 else loss


def _search(tuner, config, forget_loader, retain_loader, retain_statistics, unit_params, loss_fn, device, progress,
            notes, timings):
    """Statistics pass and mask search; returns (result, forget loss, retain loss) and fills timings."""
    clock = time.perf_counter()
    forget_grads = mask_gradients(tuner, forget_loader, loss_fn, device=device, desc="forget statistics",
                                  progress=progress)
    retain_before, retain_grads = None, None
    if config.objective == "norm":
        pass  # NORM ranks by the forget gradient alone
    elif retain_statistics is not None:
        retain_grads = retain_statistics.per_example
        retain_before = float(retain_statistics.losses[:REPORT_RETAIN].mean()) if len(retain_statistics) else None
    elif retain_loader is not None:
        retain_stats = mask_gradients(tuner, retain_loader, loss_fn, device=device, desc="retain statistics",
                                      progress=progress)
        retain_grads = retain_stats.per_example
        retain_before = float(retain_stats.losses[:REPORT_RETAIN].mean())
    else:
        notes.append("no retain set: the mask search ranks units by the forget gradient alone")
        retain_grads = {k: torch.zeros(1, *v.shape[1:]) for k, v in forget_grads.per_example.items()}
    timings["statistics"] = time.perf_counter() - clock
    clock = time.perf_counter()
    result = search_units(
        forget_grads.per_example, retain_grads, sparsity=config.sparsity, units=config.units,
        accounting=config.sparsity_accounting, rounds=int(config.rearrangement_rounds), unit_params=unit_params,
        objective=config.objective,
    )
    timings["search"] = time.perf_counter() - clock
    return result, float(forget_grads.losses.mean()), retain_before


def fixed_selection(arch, selection, *, config=None, unit_params=None, seed: int = 0) -> SearchResult:
    """A SearchResult for a given selection: ``"all"``, ``"random"`` (needs ``config``) or a dict; no scores."""
    shapes = {"heads": (arch.num_layers, arch.num_heads), "filters": (arch.num_layers, arch.num_filters)}
    if selection == "all":
        masks = {k: torch.ones(s, dtype=torch.bool) for k, s in shapes.items()}
    elif selection == "random":
        if config is None:
            raise ValueError("a random selection needs the adapter config (sparsity, units, accounting)")
        return random_selection(shapes, config.sparsity, units=config.units, accounting=config.sparsity_accounting,
                                unit_params=unit_params, seed=seed)
    elif isinstance(selection, dict):
        masks = {k: torch.zeros(s, dtype=torch.bool) for k, s in shapes.items()}
        for kind in masks:
            for layer, indices in selected_units(selection, kind, *shapes[kind]).items():
                masks[kind][layer, indices] = True
    else:
        raise ValueError(f"selection must be 'all', 'random' or a dict of heads/filters per layer, got {selection!r}")
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
