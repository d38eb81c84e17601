"""The influence edit of a LoRA adapter (SPEC §7): what retraining on the changed data would do,
to first order, without retraining.

An adapter trained to a minimum of the mean loss over n examples moves, when the training set
changes by removing examples z (and adding z'), by

    delta = (1/n) (H + lambda I)^-1 b,      b = sum_z grad l(z) - sum_z' grad l(z'),

(current minus desired: the removed or corrupted examples' pull is taken out, the corrected
ones' put in), with H the Hessian of the mean training loss at the adapter, estimated on a sample
of ``train``; for removal the second sum is empty. The phases:

1. prepare: check the model (one active PEFT LoRA adapter) and the requests, materialise a
   seeded ``train`` sample; nothing is changed before this succeeds;
2. gradients: b, in fp32, dropout off, so old and new examples of a pair see the same function
   (pairs that differ in their labels only share one forward pass);
3. solve: (H + lambda I) x = b by CG or by Adam on the quadratic (both with Hessian-vector
   products, :mod:`peft_mape.unlearning.hessian`, the solver MAPE's ``influence`` method uses),
   or exactly for H the EK-FAC estimate (:mod:`peft_mape.unlearning.kfac`);
4. step: the edit is s * x / n, for the largest s <= 1 (halving from 1, or from just above the
   scale the K-FAC quadratic model predicts) that keeps the mean loss
   of the training sample (less the edited examples) within ``retain_tolerance``: a LoRA
   Hessian is singular and usually indefinite, so the first-order step can be far too long; the
   report says how far the measured change departed from the linear prediction.

Successive calls re-linearise at the adapter as the previous edit left it (they do not
accumulate one solve). Several requests in one call add their right-hand sides and share one
solve, one n and one step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Union

import torch

from ..common.data import (
    fingerprint, forward_arguments, make_eval_loader, make_loader, materialise, pad_token_id, set_fingerprint,
    validate_examples,
)
from ..common.distributed import is_main_process, join_launch
from ..common.modes import gradients_only_for
from ..common.stopping import mean_loss, retain_budget
from ..unlearning.hessian import (
    CURVATURES, SOLVERS, InfluenceSolution, gradient_difference_sum, gradient_sum, solve_damped_system,
)
from ..unlearning.kfac import KFACCurvature, linear_blocks
from ..unlearning.preparation import PhaseTimer
from ..unlearning.step_control import halve_until, step_mover
from .adapter import active_lora_adapter, adapter_parameters, copy_adapter
from .report import EditReport, restore_adapter
from .requests import PreparedRequest, prepare_request


@dataclass
class EraseOptions:
    """Options of :func:`erase`.

    Args:
        damping: lambda of the damped system, absolute, or ``"auto"``: ``damping_ratio`` times
            the curvature of H along b (b^T H b / b^T b, one extra Hessian-vector product). The
            LoRA Hessian has flat directions (B A = (B G^-1)(G A)) and is not positive definite
            away from an exact minimum, so lambda must be positive; tying it to the curvature the
            edit actually meets keeps the same setting meaningful across models whose Hessians
            differ by orders of magnitude. A model trained with an L2 penalty (lambda/2)||theta||^2
            has exactly that lambda as its true damping.
        damping_ratio: lambda / (b^T H b / b^T b) for ``damping="auto"``. On the convex toy of the
            tests (an L2-penalised LoRA classifier, whose true damping is the penalty) the penalty
            was ~1% of the curvature along b; 0.1 over-damped the edit (cosine to the retrained
            adapter 0.79 instead of 0.94 with the exact Hessian).
        curvature: the matrix H: "gauss-newton" (J^T (d^2 loss / d logits^2) J, J = d logits /
            d adapter), "hessian" (exact, by double backward), or "kfac" (EK-FAC, block-diagonal
            Kronecker factors of the Fisher per Linear module, :mod:`peft_mape.unlearning.kfac`,
            inverted exactly: no solver iterations, so its sample can be ten times larger for the
            price of one CG iteration; it needs every adapter tensor to be a Linear weight or bias
            and the default loss). The Gauss-Newton matrix is
            positive semi-definite on any sample and ~20% cheaper per product on MiniLM, but it
            drops the curvature of the B A product itself. On the tests' convex toy: with the
            exact Hessian over the whole training set the edit lands within cosine 0.94 of the
            retrained adapter, Gauss-Newton 0.5-0.8; but the Hessian of a 64-example sample was
            indefinite there (CG stopped at negative curvature, cosine 0.3-0.6) while
            Gauss-Newton kept 0.79. A sample is what a user can afford, hence the default. With
            "hessian", when CG meets a direction of negative curvature c (d^T (H + lambda) d /
            d^T d <= 0) the damping grows by 2|c| and the solve restarts, at most
            ``damping_retries`` times (the report lists each damping tried).
        damping_retries: restarts with a larger damping after negative curvature.
        solver: "cg" (conjugate gradients on the whole Hessian sample) or "adam" (the paper's
            mini-batch minimisation of 1/2 x^T (H + lambda) x - b^T x).
        solver_steps: CG iterations or Adam steps (default 10 for CG, 100 for Adam).
        solver_lr: Adam's step size.
        hessian_examples: training examples (a seeded sample of ``train``) behind H; default 64,
            512 for "kfac". Each solver iteration costs about two forward-backward passes over
            them, so this and ``solver_steps`` set the price of the edit; "kfac" reads them in one
            forward-backward pass.
        check_examples: training examples, less the edited ones, whose mean loss bounds the step
            (one no-grad pass per scale tried).
        num_train_examples: n of the 1/n scale: the size of the adapter's training set. Default
            ``len(train)``; pass it when ``train`` is a sample.
        line_search: bound the step's scale by the training loss (see the module docstring);
            ``False`` applies the first-order step at scale 1.
        retain_tolerance: relative rise of the guarded training loss the edit may cause (at
            least ``retain_tolerance`` x 0.1 nats).
        copy_to: write the edit into a new adapter of this name (a copy of the active one, then
            made active) and leave the original untouched.
        batch_size: examples per gradient / Hessian-vector-product batch.
        loss_fn: ``loss_fn(outputs, batch) -> tensor[batch]``; default the model's own per-example
            loss (the training loss: cross-entropy, answer-token mean for causal LMs).
        seed: seeds the ``train`` sample.
        progress: show tqdm bars.
    """

    damping: Union[float, str] = "auto"
    damping_ratio: float = 0.01
    curvature: str = "gauss-newton"
    damping_retries: int = 2
    solver: str = "cg"
    solver_steps: Optional[int] = None
    solver_lr: float = 1e-2
    hessian_examples: Optional[int] = None
    check_examples: int = 128
    num_train_examples: Optional[int] = None
    line_search: bool = True
    retain_tolerance: float = 0.1
    copy_to: Optional[str] = None
    batch_size: int = 16
    loss_fn: Optional[Callable] = None
    seed: int = 0
    progress: bool = True

    def validate(self) -> None:
        if isinstance(self.damping, str):
            if self.damping != "auto":
                raise ValueError(f"damping must be a number >= 0 or 'auto', got {self.damping!r}")
        elif not self.damping >= 0:
            raise ValueError(f"damping must be a number >= 0 or 'auto', got {self.damping}")
        if not self.damping_ratio > 0:
            raise ValueError(f"damping_ratio must be > 0, got {self.damping_ratio}")
        if self.curvature not in (*CURVATURES, "kfac"):
            raise ValueError(f"curvature must be one of {[*CURVATURES, 'kfac']}, got {self.curvature!r}")
        if self.curvature == "kfac" and self.loss_fn is not None:
            raise ValueError("curvature='kfac' samples labels from the model's own predictive distribution, which "
                             "needs the default loss; with a loss_fn use curvature='gauss-newton'")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {list(SOLVERS)}, got {self.solver!r}")
        if not (isinstance(self.damping_retries, int) and self.damping_retries >= 0):
            raise ValueError(f"damping_retries must be an integer >= 0, got {self.damping_retries!r}")
        if self.hessian_examples is None:
            self.hessian_examples = 512 if self.curvature == "kfac" else 64
        for name in ("hessian_examples", "check_examples", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.solver_steps is not None and not self.solver_steps >= 1:
            raise ValueError(f"solver_steps must be >= 1, got {self.solver_steps}")
        if self.num_train_examples is not None and not self.num_train_examples >= 1:
            raise ValueError(f"num_train_examples must be >= 1, got {self.num_train_examples}")
        if not self.retain_tolerance >= 0:
            raise ValueError(f"retain_tolerance must be >= 0, got {self.retain_tolerance}")


def _training_set_size(train, given: Optional[int]) -> tuple[int, str]:
    if given is not None:
        return int(given), "num_train_examples"
    sized = getattr(train, "dataset", train)
    if hasattr(sized, "__len__"):
        return len(sized), "len(train)"
    raise ValueError("num_train_examples: train has no length (an iterable dataset?); pass num_train_examples=N, "
                     "the size of the adapter's training set")


def _requests(request) -> list:
    requests = list(request) if isinstance(request, (list, tuple)) else [request]
    if not requests:
        raise ValueError("request: the list of requests is empty")
    return requests


def _describe(prepared: PreparedRequest) -> dict:
    out = {"kind": prepared.kind, "num_examples": len(prepared.old),
           "old_fingerprint": set_fingerprint(fingerprint(e) for e in prepared.old)}
    if prepared.new:
        out["new_fingerprint"] = set_fingerprint(fingerprint(e) for e in prepared.new)
    return out


def _share_inputs(prepared: list[PreparedRequest]) -> bool:
    """Whether every old/new pair differs in its labels only (response corrections of a
    classifier), so one forward pass serves both gradients."""
    if not prepared or any(not p.new for p in prepared):
        return False
    return all(set(o) == set(n) and all(k == "labels" or torch.equal(o[k], n[k]) for k in o)
               for p in prepared for o, n in zip(p.old, p.new))


def _dot(a, b) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))


def erase(model, request, train, **options: Any) -> EditReport:
    """Apply the influence edit of ``request`` (one request or a list) to ``model``'s active LoRA
    adapter, in place (or into ``copy_to``); ``train``: the adapter's training data, or a sample
    of it with ``num_train_examples``. ``options``: :class:`EraseOptions` fields. On failure the
    model is left as it was; :func:`peft_mape.llmeraser.undo` reverts a successful edit exactly."""
    unknown = sorted(set(options) - {f.name for f in fields(EraseOptions)})
    if unknown:
        raise TypeError(f"erase() got unknown option(s) {unknown}; allowed: {[f.name for f in fields(EraseOptions)]}")
    opts = EraseOptions(**options)
    opts.validate()
    join_launch()
    progress = opts.progress and is_main_process()  # one set of bars, not one per process
    timer = PhaseTimer()
    with timer.phase("prepare"):
        source_adapter = active_lora_adapter(model)
        allowed = forward_arguments(model)
        prepared = [prepare_request(r, allowed, model) for r in _requests(request)]
        n, n_source = _training_set_size(train, opts.num_train_examples)
        sample = materialise(train, allowed, limit=max(opts.hessian_examples, opts.check_examples), seed=opts.seed,
                             what="train")
        validate_examples(sample, "train", needs_labels=opts.loss_fn is None, model=model)
        old = [e for p in prepared for e in p.old]
        new = [e for p in prepared for e in p.new]
        edited = {fingerprint(e) for e in old + new}
        guarded = [e for e in sample if fingerprint(e) not in edited][:opts.check_examples]
        if not guarded:
            raise ValueError("train: every sampled training example is one the request edits; the edit needs "
                             "other training examples to bound its step")
        pad, device = pad_token_id(model), next(model.parameters()).device
        eval_size = max(opts.batch_size, 32)
        loaders = {"old": make_eval_loader(old, eval_size, pad), "train": make_eval_loader(guarded, eval_size, pad)}
        if new:
            loaders["new"] = make_eval_loader(new, eval_size, pad)
        # collated once: the damping's product and every solver iteration read the same batches
        hessian_batches = list(make_loader(sample[:opts.hessian_examples], opts.batch_size, pad))
    adapter = opts.copy_to or source_adapter
    named, originals = [], {}

    def losses(keys=tuple(loaders)) -> dict:
        return {key: mean_loss(model, loaders[key], opts.loss_fn, device=device) for key in keys}

    try:
        if opts.copy_to is not None:
            copy_adapter(model, source_adapter, opts.copy_to)
        named = adapter_parameters(model, adapter)
        params = [p for _, p in named]
        if opts.curvature == "kfac":
            linear_blocks(model, params)  # refuse adapters it cannot factorise before any pass
        originals = {name: p.detach().clone() for name, p in named}
        with gradients_only_for(model, params):
            paired = _share_inputs(prepared)
            with timer.phase("measure"):
                before = losses(("train",) if paired else tuple(loaders))
            with timer.phase("gradients"):
                if paired:  # one forward per pair; it also measures the old and new losses
                    rhs, before["old"], before["new"] = gradient_difference_sum(
                        model, params, make_loader(old, opts.batch_size, pad), make_loader(new, opts.batch_size, pad),
                        opts.loss_fn, device=device, desc="old - new gradients", progress=progress)
                else:
                    rhs = gradient_sum(model, params, make_loader(old, opts.batch_size, pad), opts.loss_fn,
                                       device=device, desc="removed / old gradients", progress=progress)
                    if new:
                        desired = gradient_sum(model, params, make_loader(new, opts.batch_size, pad), opts.loss_fn,
                                               device=device, desc="new gradients", progress=progress)
                        rhs = [r - d for r, d in zip(rhs, desired)]
            with timer.phase("solve"):
                solve = _kfac_solve if opts.curvature == "kfac" else _matrix_free_solve
                solution, dampings, rule, quadratic = solve(model, params, rhs, hessian_batches, opts, device,
                                                            progress)
                damping = dampings[-1]
        direction = [x / n for x in solution.solution]
        with timer.phase("step"):
            step = _apply_step(params, direction, rhs, len(old), before, losses, opts, quadratic)
        after = step["after"]
    except BaseException:
        restore_adapter(model, originals, source_adapter, adapter)
        raise
    warnings = list(step["warnings"])
    if len(dampings) > 1:
        rule += f"; raised to {dampings[-1]:.4g} after CG met negative curvature at {dampings[-2]:.4g}"
    if solution.negative_curvature:
        warnings.append(f"CG met negative curvature of H + damping even at damping {damping:.4g} and stopped there: "
                        "raise damping (or damping_ratio)")
    if solution.relative_residual > 0.5:
        warnings.append(f"the solver left a relative residual of {solution.relative_residual:.2f}: the step solves "
                        "the damped system only roughly (more solver_steps, or more damping)")
    return EditReport(
        requests=[_describe(p) for p in prepared], adapter_name=source_adapter, edited_adapter=adapter,
        num_train_examples=n, num_train_examples_source=n_source, hessian_examples=len(sample[:opts.hessian_examples]),
        damping=dampings[-1], damping_rule=rule, dampings_tried=dampings, curvature=opts.curvature,
        solver="direct" if opts.curvature == "kfac" else opts.solver, solver_iterations=solution.iterations,
        relative_residual=solution.relative_residual, negative_curvature=solution.negative_curvature,
        scale=step["scale"], update_norm=step["scale"] * step["full_norm"], full_step_norm=step["full_norm"],
        linearisation_ratio=step["ratio"], losses_before=before, losses_after=after,
        retain_loss_budget=step["budget"], candidates=step["candidates"], warnings=warnings, seconds=timer.seconds,
        originals={} if opts.copy_to else originals,
    )


def _damping(rhs, opts: EraseOptions, quadratic, matrix: str = "H") -> tuple[float, str]:
    """The damping: given, or ``damping_ratio`` x |b^T M b / b^T b| for ``quadratic(v) = v^T M v``."""
    if not isinstance(opts.damping, str):
        return float(opts.damping), "given"
    norm_sq = _dot(rhs, rhs)
    if norm_sq == 0:
        return 0.0, "auto: b = 0"
    curvature = quadratic(rhs) / norm_sq
    # Along b the Hessian can be flat or negative away from a minimum; the magnitude still says
    # which scale of curvature the edit meets.
    damping = opts.damping_ratio * max(abs(curvature), 1e-12)
    return damping, (f"auto: {opts.damping_ratio} x |b^T {matrix} b / b^T b| = {opts.damping_ratio} x "
                     f"{abs(curvature):.4g}")


def _matrix_free_solve(model, params, rhs, hessian_batches, opts: EraseOptions, device, progress):
    def quadratic(v):
        return _dot(v, CURVATURES[opts.curvature](model, params, hessian_batches, v, opts.loss_fn, device=device))

    damping, rule = _damping(rhs, opts, quadratic)
    dampings = []
    for _ in range(opts.damping_retries + 1):
        dampings.append(damping)
        solution = solve_damped_system(model, params, rhs, hessian_batches, opts.loss_fn, device=device,
                                       damping=damping, curvature=opts.curvature, solver=opts.solver,
                                       steps=opts.solver_steps, lr=opts.solver_lr, progress=progress)
        if not solution.negative_curvature:
            break
        # Just enough to make the direction CG met positive: its curvature
        # d^T (H + damping) d / d^T d was solution.least_curvature <= 0.
        damping += 2 * abs(solution.least_curvature) + 1e-12
    return solution, dampings, rule, None


def _kfac_solve(model, params, rhs, hessian_batches, opts: EraseOptions, device, progress):
    curvature = KFACCurvature(model, params, hessian_batches, device=device, seed=opts.seed, progress=progress)
    damping, rule = _damping(rhs, opts, curvature.quadratic, matrix="K (EK-FAC)")
    # Exact for the K-FAC matrix, so its own residual is 0; how far K is from H shows in the
    # step's linearisation ratio.
    return InfluenceSolution(curvature.solve(rhs, damping), 0, 0.0), [damping], rule, curvature.quadratic


def _first_scale(direction, budget_rise: float, quadratic) -> float:
    """Where the halving starts: 1, or, when the curvature's quadratic form is free (K-FAC), twice
    the scale at which the training loss's quadratic model 1/2 s^2 d^T K d reaches the budget
    (rounded up to a power of two): the scales far above it would only be tried and refused."""
    if quadratic is None:
        return 1.0
    curved = quadratic(direction)
    if not curved > 0:
        return 1.0
    predicted = math.sqrt(2 * budget_rise / curved)
    return min(1.0, 2.0 ** math.ceil(math.log2(max(2 * predicted, 1e-30))))


def _apply_step(params, direction, rhs, num_old: int, before: dict, losses, opts: EraseOptions,
                quadratic=None) -> dict:
    move_to = step_mover(params, direction, "the influence edit")
    def gap(measured: dict) -> float:  # what the edit should raise: old examples' loss minus new ones'
        return measured["old"] - measured.get("new", 0.0)

    # first-order change of gap() along the direction: (sum_old g - sum_new g) . d / |old|
    slope = _dot(rhs, direction) / max(num_old, 1)
    full_norm = _dot(direction, direction) ** 0.5
    budget = retain_budget(before["train"], opts.retain_tolerance) if opts.line_search else None
    candidates = []

    def attempt(scale: float) -> dict:
        move_to(scale)
        result = dict(losses(("train",)), scale=scale)
        result["within_budget"] = budget is None or result["train"] <= budget
        candidates.append(result)
        return result

    if opts.line_search:
        first = _first_scale(direction, budget - before["train"], quadratic)
        scale, _ = halve_until(attempt, lambda result: result["within_budget"], first)
    else:
        scale = 1.0
    move_to(scale)
    at = losses() if scale > 0 else dict(before)
    ratio = None
    if scale > 0 and abs(slope * scale) > 1e-12:
        ratio = (gap(at) - gap(before)) / (slope * scale)
    warnings = []
    if scale == 0.0:
        warnings.append("every step scale down to 2^-10 raised the training loss beyond its budget: no edit was "
                        "applied (raise damping, or the request is too large for a first-order edit)")
    if ratio is not None and not 0.5 <= ratio <= 2.0:
        warnings.append(f"the edited examples' losses changed {ratio:.2f}x as much as the linearisation predicts at "
                        "the chosen scale: the influence approximation does not hold there")
    return {"scale": scale, "full_norm": full_norm, "ratio": ratio, "budget": budget, "candidates": candidates,
            "after": at, "warnings": warnings}
