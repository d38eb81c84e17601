"""SO (MAPE-SO): one closed-form step with the diagonal retain Fisher of the selected parameters (SPEC §4)."""

from __future__ import annotations

from dataclasses import dataclass


from ..statistics import parameter_fisher_diagonal
from .base import ClosedFormContext, ClosedFormMethod, StepResult, register_method  # noqa: F401


@register_method
@dataclass
class SecondOrder(ClosedFormMethod):
    """theta <- theta* + (``scale``/n) (F_r + lambda)^-1 sum_forget grad l, F_r the diagonal
    empirical Fisher of the selected parameters on the retain sample.

    Options:
        damping: lambda relative to the mean of F_r over the selected parameters.
        scale: multiplies the step (1.0 is the specification's 1/n influence step) before the
            line search (see :class:`ClosedFormMethod`) scales it again.
    """

    damping: float = 1e-3
    scale: float = 1.0
    name = "so"

    def step(self, context: ClosedFormContext) -> StepResult:
        data = context.data
        grad_sum = context.forget_gradient_sum()
        fisher = parameter_fisher_diagonal(context.tuner, context.adapter_name, data.retain_loader, data.loss_fn,
                                           device=data.device, progress=data.progress)
        direction = second_order_direction(grad_sum, fisher, num_train_examples=context.num_train_examples,
                                           damping=self.damping, scale=self.scale)
        return self.apply(context, direction, grad_sum)

    def validate(self) -> None:
        super().validate()
        if not self.damping > 0:
            raise ValueError(f"method '{self.name}': damping must be > 0, got {self.damping}")


def second_order_direction(forget_grad_sum, retain_fisher, *, num_train_examples: int, damping: float = 1e-3,
                           scale: float = 1.0) -> list:
    """The SO step (scale/n) (F_r + lambda)^-1 sum_forget grad l, one tensor per parameter.

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
    return [eta * grad / (fisher + lam) for grad, fisher in zip(forget_grad_sum, retain_fisher)]
