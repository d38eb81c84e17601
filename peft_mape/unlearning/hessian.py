"""Influence (IHVP) step on a set of parameters (SPEC §4 "Influence", shared with §7).

Removing the examples z_1..z_k from a model trained to a minimum of the mean loss over n
examples moves the parameters, to first order, by

    delta = (1/n) (H + lambda I)^-1 b,      b = sum_i grad l(z_i),

with H the Hessian of the mean training loss (estimated on the retain sample) and lambda a
damping that keeps the system well posed (the Hessian of a fine-tuned network is
ill-conditioned and can be indefinite). H is never formed: the solvers only need
Hessian-vector products, computed by double backward (dropout off, so every product sees the
same function). Two solvers:

- ``"cg"``: conjugate gradients on the full Hessian sample (deterministic);
- ``"adam"``: minimise the quadratic 1/2 x^T (H + lambda) x - b^T x with Adam, one mini-batch
  Hessian-vector product per step (stochastic, cheaper per step).

Both report the relative residual ||(H + lambda) x - b|| / ||b|| on the whole Hessian sample.
H may also be the generalised Gauss-Newton matrix (``curvature="gauss-newton"``), positive
semi-definite where the Hessian of a network is indefinite.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from ..common.data import default_per_example_loss, forward_with_losses, per_example_losses, to_device
from ..common.distributed import RowShard, refuse_sharded, sum_across, sum_count
from ..common.modes import eval_mode

SOLVERS = ("cg", "adam")
Vector = list[torch.Tensor]


def _dot(a: Vector, b: Vector) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _axpy(alpha, x: Vector, y: Vector) -> Vector:
    """alpha * x + y."""
    return [alpha * xi + yi for xi, yi in zip(x, y)]


def _norm(v: Vector) -> float:
    return math.sqrt(float(_dot(v, v)))


def accumulator_dtype(param: torch.Tensor) -> torch.dtype:
    """At least fp32: sums of gradients and Hessian-vector products of bf16/fp16 tensors lose
    most of their digits in their own precision."""
    return torch.promote_types(param.dtype, torch.float32)


def gradient_sum(model, params: Sequence[torch.Tensor], loader, loss_fn=None, *, device, desc="gradient",
                 progress=True) -> Vector:
    """Sum over the examples of ``loader`` of d loss / d param (dropout off), in fp32 or wider."""
    refuse_sharded(model, "a gradient sum")
    totals = [torch.zeros_like(p, dtype=accumulator_dtype(p)) for p in params]
    with eval_mode(model):
        for batch in tqdm(RowShard(loader), desc=desc, disable=not progress, leave=False):
            batch = to_device(batch, device)
            losses = per_example_losses(model, batch, loss_fn)
            for total, grad in zip(totals, torch.autograd.grad(losses.sum(), params, allow_unused=True)):
                if grad is not None:
                    total.add_(grad)
    sum_across(totals)
    return totals


def gradient_difference_sum(model, params: Sequence[torch.Tensor], loader, new_loader, loss_fn=None, *, device,
                            desc="gradient difference", progress=True) -> tuple[Vector, float, float]:
    """Sum over aligned pairs of d [loss(old) - loss(new)] / d param (dropout off, fp32 or wider),
    where ``loader`` and ``new_loader`` yield the same inputs batch for batch and differ only in
    their labels (a response correction of a classifier): one forward and one backward pass per
    pair instead of two of each. Also the mean old and new losses, which that forward measured."""
    refuse_sharded(model, "a gradient sum")
    totals = [torch.zeros_like(p, dtype=accumulator_dtype(p)) for p in params]
    loss_of = loss_fn or default_per_example_loss
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with eval_mode(model):
        for batch, new_batch in tqdm(zip(RowShard(loader), RowShard(new_loader)), desc=desc, disable=not progress,
                                     leave=False):
            batch, new_labels = to_device(batch, device), new_batch["labels"].to(device)
            outputs, old_losses = forward_with_losses(model, batch, loss_fn)
            new_losses = loss_of(outputs, dict(batch, labels=new_labels))
            if not torch.isfinite(new_losses).all():
                raise FloatingPointError("non-finite loss (NaN or inf) on a corrected example")
            difference = old_losses.sum() - new_losses.sum()
            for total, grad in zip(totals, torch.autograd.grad(difference, params, allow_unused=True)):
                if grad is not None:
                    total.add_(grad)
            sums += torch.tensor([float(old_losses.detach().sum()), float(new_losses.detach().sum()),
                                  old_losses.shape[0]], dtype=torch.float64, device=device)
    sum_across(totals + [sums])
    count = max(float(sums[2]), 1.0)
    return totals, float(sums[0]) / count, float(sums[1]) / count


def hessian_vector_product(model, params: Sequence[torch.Tensor], batches, vector: Vector, loss_fn=None, *,
                           device) -> Vector:
    """H v for H the Hessian of the mean per-example loss over ``batches``, by double backward."""
    total = [torch.zeros_like(p, dtype=accumulator_dtype(p)) for p in params]
    count = 0
    # The fused CPU/GPU attention kernels have no double backward; the math kernel is plain
    # autograd ops and gives the same function.
    with eval_mode(model), sdpa_kernel(SDPBackend.MATH):
        for batch in RowShard(batches):
            batch = to_device(batch, device)
            losses = per_example_losses(model, batch, loss_fn)
            grads = torch.autograd.grad(losses.sum(), params, create_graph=True)
            directional = sum((g * v.to(g.dtype)).sum() for g, v in zip(grads, vector))
            # A parameter the gradient does not depend on has a zero Hessian row.
            for acc, hv in zip(total, torch.autograd.grad(directional, params, allow_unused=True)):
                if hv is not None:
                    acc.add_(hv.detach())
            count += losses.shape[0]
    sum_across(total)
    return [t / max(sum_count(count), 1) for t in total]


def gauss_newton_vector_product(model, params: Sequence[torch.Tensor], batches, vector: Vector, loss_fn=None, *,
                                device) -> Vector:
    """G v for G = J^T (d^2 loss / d logits^2) J the generalised Gauss-Newton matrix of the mean
    per-example loss over ``batches`` (J = d logits / d params): positive semi-definite for a
    convex loss of the logits (cross-entropy, MSE), unlike the Hessian of a network away from an
    exact minimum. J v by forward-mode ``torch.func.jvp``, J^T u by one backward pass. ``loss_fn``
    must depend on the outputs only through ``outputs.logits``."""
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = [by_id[id(p)] for p in params]
    loss_of_logits = loss_fn or default_per_example_loss
    total = [torch.zeros_like(p, dtype=accumulator_dtype(p)) for p in params]
    count = 0
    with eval_mode(model), sdpa_kernel(SDPBackend.MATH):
        for batch in RowShard(batches):
            batch = to_device(batch, device)
            inputs = {k: v for k, v in batch.items() if k != "labels"}

            def logits_of(*tensors):
                return torch.func.functional_call(model, dict(zip(names, tensors)), (), inputs).logits

            primals = tuple(p.detach() for p in params)
            tangents = tuple(v.to(p.dtype) for v, p in zip(vector, params))
            logits, j_v = torch.func.jvp(logits_of, primals, tangents)
            z = logits.detach().requires_grad_(True)
            losses = loss_of_logits(SimpleNamespace(logits=z), batch)
            (dz,) = torch.autograd.grad(losses.sum(), z, create_graph=True)
            (h_j_v,) = torch.autograd.grad((dz * j_v.detach()).sum(), z)
            outputs = model(**inputs).logits
            for acc, gv in zip(total, torch.autograd.grad(outputs, params, grad_outputs=h_j_v.to(outputs.dtype),
                                                          allow_unused=True)):
                if gv is not None:
                    acc.add_(gv.detach())
            count += losses.shape[0]
    sum_across(total)
    return [t / max(sum_count(count), 1) for t in total]


CURVATURES = {"hessian": hessian_vector_product, "gauss-newton": gauss_newton_vector_product}


@dataclass
class InfluenceSolution:
    """The solution x of (H + lambda I) x = b and how well it solves the system."""

    solution: Vector
    iterations: int
    relative_residual: float
    negative_curvature: bool = False
    # CG: the least d^T (H + lambda) d / d^T d along its directions (None for Adam); negative
    # when it met negative curvature, and then by how much.
    least_curvature: Optional[float] = None


@dataclass
class SolverSettings:
    """How :func:`solve_damped_system` solves: ``solver`` "cg" or "adam", ``steps`` (default 10
    for CG, 100 for Adam), Adam's ``lr``, CG's relative-residual ``tolerance``, and the
    ``curvature`` matrix: "hessian" or "gauss-newton" (:data:`CURVATURES`)."""

    solver: str = "cg"
    curvature: str = "hessian"
    steps: Optional[int] = None
    lr: float = 1e-2
    tolerance: float = 1e-3


def solve_damped_system(model, params: Sequence[torch.Tensor], rhs: Vector, hessian_loader, loss_fn=None, *,
                        device, damping: float, progress: bool = True, **settings) -> InfluenceSolution:
    """Solve (H + damping I) x = rhs with Hessian-vector products over ``hessian_loader``;
    ``settings`` are :class:`SolverSettings` fields."""
    settings = SolverSettings(**settings)
    solver, steps, lr, tolerance = settings.solver, settings.steps, settings.lr, settings.tolerance
    if solver not in SOLVERS:
        raise ValueError(f"unknown influence solver {solver!r}; choose one of {list(SOLVERS)}")
    if damping < 0:
        raise ValueError(f"the damping must be >= 0, got {damping}")
    if settings.curvature not in CURVATURES:
        raise ValueError(f"unknown curvature {settings.curvature!r}; choose one of {list(CURVATURES)}")
    curvature_product = CURVATURES[settings.curvature]
    refuse_sharded(model, "the damped curvature solve")
    params = list(params)
    rhs = [r.detach().to(accumulator_dtype(p)) for r, p in zip(rhs, params)]
    batches = list(hessian_loader)
    if not batches:
        raise ValueError("the influence step needs a non-empty retain sample for the Hessian")

    def damped_product(v: Vector, sample=batches) -> Vector:
        hv = curvature_product(model, params, sample, v, loss_fn, device=device)
        return _axpy(damping, v, hv)

    if solver == "cg":
        # CG's recurrence carries the residual b - A x: no extra product to measure it.
        x, iterations, negative, residual, least = _conjugate_gradients(damped_product, rhs, steps or 10, tolerance,
                                                                        progress)
    else:
        x, iterations, negative = _adam_quadratic(damped_product, rhs, batches, steps or 100, lr, progress)
        residual, least = _axpy(-1.0, rhs, damped_product(x)), None
    rhs_norm = _norm(rhs)
    return InfluenceSolution(x, iterations, _norm(residual) / rhs_norm if rhs_norm > 0 else 0.0, negative, least)


def _conjugate_gradients(product, rhs: Vector, steps: int, tolerance: float, progress: bool):
    x = [torch.zeros_like(r) for r in rhs]
    residual = [r.clone() for r in rhs]
    direction = [r.clone() for r in rhs]
    rr = _dot(residual, residual)
    target = tolerance**2 * float(rr)
    negative, iterations, least = False, 0, None
    for _ in tqdm(range(steps), desc="influence (cg)", disable=not progress, leave=False):
        if float(rr) <= target:
            break
        a_dir = product(direction)
        curvature = _dot(direction, a_dir)
        rayleigh = float(curvature) / max(float(_dot(direction, direction)), 1e-300)
        least = rayleigh if least is None else min(least, rayleigh)
        if float(curvature) <= 0:
            # The damped Hessian is not positive definite along this direction: stop with the
            # current iterate rather than step to a saddle; the caller sees it in the report.
            negative = True
            break
        alpha = float(rr / curvature)
        x = _axpy(alpha, direction, x)
        residual = _axpy(-alpha, a_dir, residual)
        rr_next = _dot(residual, residual)
        direction = _axpy(float(rr_next / rr), direction, residual)
        rr = rr_next
        iterations += 1
    return x, iterations, negative, residual, least


def _adam_quadratic(product, rhs: Vector, batches, steps: int, lr: float, progress: bool):
    """Adam on q(x) = 1/2 x^T A x - b^T x, whose gradient A x - b uses one mini-batch product."""
    x = [torch.zeros_like(r, requires_grad=True) for r in rhs]
    optimizer = torch.optim.Adam(x, lr=lr)
    cycle = itertools.cycle(batches)
    for _ in tqdm(range(steps), desc="influence (adam)", disable=not progress, leave=False):
        with torch.no_grad():
            detached = [xi.detach() for xi in x]
        gradient = _axpy(-1.0, rhs, product(detached, [next(cycle)]))
        for xi, gi in zip(x, gradient):
            xi.grad = gi.to(xi.dtype)
        optimizer.step()
    return [xi.detach() for xi in x], steps, False


def influence_direction(solution: Vector, *, num_train_examples: int) -> list:
    """The influence step x / n of a solution x of the damped system."""
    if num_train_examples <= 0:
        raise ValueError(f"num_train_examples must be positive, got {num_train_examples}")
    return [x / num_train_examples for x in solution]
