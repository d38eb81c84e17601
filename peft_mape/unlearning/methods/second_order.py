"""SO (MAPE-SO): one closed-form step with the diagonal retain Fisher of the selected parameters (SPEC §4)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..statistics import parameter_fisher_diagonal
from .base import ClosedFormContext, ClosedFormMethod, StepResult, register_method


@register_method
@dataclass
class SecondOrder(ClosedFormMethod):
    """theta <- theta* + (``scale``/n) (F_r + lambda)^-1 sum_forget grad l, F_r the diagonal
    empirical Fisher of the selected parameters on the retain sample.

    Options:
        damping: lambda relative to the mean of F_r over the selected parameters.
        scale: multiplies the step (1.0 is the specification's 1/n influence step).
    """

    damping: float = 1e-3
    scale: float = 1.0
    name = "so"

    def step(self, context: ClosedFormContext) -> StepResult:
        data = context.data
        grad_sum = context.forget_gradient_sum()
        fisher = parameter_fisher_diagonal(context.tuner, context.adapter_name, data.retain_loader, data.loss_fn,
                                           device=data.device, progress=data.progress)
        second_order_step(context.params, grad_sum, fisher, num_train_examples=context.num_train_examples,
                          damping=self.damping, scale=self.scale)
        return StepResult()

    def validate(self) -> None:
        super().validate()
        if not self.damping > 0:
            raise ValueError(f"method '{self.name}': damping must be > 0, got {self.damping}")


def second_order_step(params, forget_grad_sum, retain_fisher, *, num_train_examples: int, damping: float = 1e-3,
                      scale: float = 1.0) -> float:
    """Apply the SO step in place; returns the update's L2 norm.

    ``damping`` is relative: lambda = damping * mean(F_r) over all selected parameters.
    """
    if num_train_examples <= 0:
        raise ValueError(f"num_train_examples must be positive, got {num_train_examples}")
    total = sum(float(f.sum()) for f in retain_fisher)
    count = sum(f.numel() for f in retain_fisher)
    lam = damping * total / max(count, 1)
    if lam <= 0:  # an all-zero Fisher (e.g. a dead unit) still needs a finite step
        lam = damping
    eta = scale / num_train_examples
    squared = 0.0
    with torch.no_grad():
        for param, grad, fisher in zip(params, forget_grad_sum, retain_fisher):
            step = eta * grad / (fisher + lam)
            if not torch.isfinite(step).all():
                raise FloatingPointError("the SO step is not finite (NaN/inf in gradients or Fisher)")
            param.add_(step.to(param.dtype))
            squared += float(step.double().pow(2).sum())
    return math.sqrt(squared)
