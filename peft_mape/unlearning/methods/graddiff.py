"""GradDiff: ascent on the forget loss, descent on the retain loss (SPEC §4); the default method."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import LoopMethod, StepLosses, register_method


@register_method
@dataclass
class GradDiff(LoopMethod):
    """Minimise -mean w l(forget) + ``retain_weight`` x mean l(retain), w = 0 for the examples
    already at the stopping target's level (``per_example_cap``), else 1.

    Options:
        retain_weight: weight of the retain loss, which keeps the model's behaviour on the
            remaining data while the forget loss rises.
    """

    retain_weight: float = 1.0
    name = "graddiff"

    @property
    def needs_retain(self) -> bool:
        return True

    def loss(self, losses: StepLosses) -> torch.Tensor:
        return -(self.forget_weights(losses) * losses.forget).mean() + self.retain_weight * losses.retain.mean()

    def validate(self) -> None:
        super().validate()
        if self.retain_weight < 0:
            raise ValueError(f"method '{self.name}': retain_weight must be >= 0, got {self.retain_weight}")
