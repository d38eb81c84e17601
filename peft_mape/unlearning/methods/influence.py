"""Influence: the inverse-Hessian step of removing the forget set, by Hessian-vector products (SPEC §4, §7)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ...common.data import make_loader
from ..hessian import SOLVERS, influence_direction, solve_damped_system
from .base import ClosedFormContext, ClosedFormMethod, StepResult, register_method


@register_method
@dataclass
class Influence(ClosedFormMethod):
    """theta <- theta* + (1/n) (H + lambda I)^-1 sum_forget grad l, H the Hessian of the retain
    loss on the first ``hessian_examples`` retain examples; H is never formed.

    Options:
        damping: lambda, absolute. The retain Hessian of a fine-tuned network is indefinite:
            1e-2 left CG at a relative residual of ~10 on SmolLM2/TOFU and 0.1 met negative
            curvature on a tiny LM, hence 1.0; the report's diagnostics say when it is too small.
        solver: "cg" (conjugate gradients on the whole Hessian sample) or "adam" (minimise
            1/2 x^T (H + lambda) x - b^T x with one mini-batch product per step).
        solver_steps: iterations (default 10 for CG, 100 for Adam).
        hessian_examples: retain examples behind the Hessian.
    """

    damping: float = 1.0
    solver: str = "cg"
    solver_steps: Optional[int] = None
    hessian_examples: int = 256
    name = "influence"

    def step(self, context: ClosedFormContext) -> StepResult:
        data = context.data
        grad_sum = context.forget_gradient_sum()
        hessian_loader = make_loader(data.retain_examples[:self.hessian_examples], data.batch_size, data.pad_token_id)
        solution = solve_damped_system(data.model, context.params, grad_sum, hessian_loader, data.loss_fn,
                                       device=data.device, damping=self.damping, solver=self.solver,
                                       steps=self.solver_steps, progress=data.progress)
        result = StepResult(steps=solution.iterations,
                            diagnostics={"relative_residual": solution.relative_residual,
                                         "negative_curvature": solution.negative_curvature})
        if solution.negative_curvature:
            result.report_warnings.append("influence CG stopped at a direction of negative curvature; raise damping")
        direction = influence_direction(solution.solution, num_train_examples=context.num_train_examples)
        return self.apply(context, direction, grad_sum, result)

    def validate(self) -> None:
        super().validate()
        if self.damping < 0:
            raise ValueError(f"method '{self.name}': damping must be >= 0, got {self.damping}")
        if self.solver not in SOLVERS:
            raise ValueError(f"method '{self.name}': solver must be one of {list(SOLVERS)}, got {self.solver!r}")
        if self.hessian_examples < 1:
            raise ValueError(f"method '{self.name}': hessian_examples must be >= 1, got {self.hessian_examples}")
