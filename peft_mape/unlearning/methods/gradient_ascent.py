"""GA: gradient ascent on the forget loss (SPEC §4)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LoopMethod, StepLosses, register_method


@register_method
@dataclass
class GradientAscent(LoopMethod):
    """Maximise the mean forget loss (of the examples not yet at the target's level, see
    ``per_example_cap``). Nothing holds the rest of the model in place, so pair it
    with a stopping target (``holdout=`` or ``forget_loss_target=``) or a small ``max_steps``."""

    name = "ga"

    def loss(self, losses: StepLosses) -> torch.Tensor:
        return -(self.forget_weights(losses) * losses.forget).mean()
