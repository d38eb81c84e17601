"""NPO: negative preference optimisation (Zhang et al. 2024) against the model without this adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LoopMethod, StepLosses, register_method


@register_method
@dataclass
class NPO(LoopMethod):
    """Minimise -(2/beta) mean log sigmoid(beta (l - l_ref)) on the forget set, plus
    ``retain_weight`` x mean l(retain).

    With per-example losses as negative log-likelihoods, log(pi/pi_ref) = l_ref - l, so this is
    (2/beta) mean log(1 + (pi/pi_ref)^beta): gradient ascent whose push fades once an example's
    likelihood has dropped below the reference's. The reference is the model with this adapter
    muted (one no-grad forward per step, never a second copy of the weights).

    Options:
        beta: inverse temperature; the default loss averages over answer tokens, so it acts per token.
        retain_weight: weight of the retain loss (0: pure NPO, no retain set needed).
    """

    beta: float = 0.1
    retain_weight: float = 1.0
    name = "npo"
    needs_reference = True

    @property
    def needs_retain(self) -> bool:
        return self.retain_weight > 0 or self.kl_weight > 0

    def loss(self, losses: StepLosses) -> torch.Tensor:
        gap = losses.forget - losses.forget_reference
        value = -(2.0 / self.beta) * (self.forget_weights(losses) * F.logsigmoid(self.beta * gap)).mean()
        if self.retain_weight > 0:
            value = value + self.retain_weight * losses.retain.mean()
        return value

    def validate(self) -> None:
        super().validate()
        if not self.beta > 0:
            raise ValueError(f"method '{self.name}': beta must be positive, got {self.beta}")
        if self.retain_weight < 0:
            raise ValueError(f"method '{self.name}': retain_weight must be >= 0, got {self.retain_weight}")
