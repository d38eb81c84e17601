"""When the forget set looks unseen, and how far an update may go: the stopping targets and the
retain-loss trust region that the loop (:mod:`.loop`) and the closed-form line search share.

A :class:`HoldoutTarget` is reached once a loss-based membership attack can no longer tell the
forget set from held-out data (the *distribution*, not the mean: a few examples with a huge loss
carry the mean long before most examples are forgotten); a number is reached once the forget
set's mean loss reaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .data import per_example_losses, to_device
from .distributed import RowShard, is_sharded
from .membership import loss_mia_auc
from .modes import eval_mode


@dataclass
class HoldoutTarget:
    """The forget set looks unseen once the loss-based membership AUC of forget vs holdout
    examples is at most ``0.5 + tolerance``.

    ``holdout_losses`` are per-example losses of data the model never trained on, measured once
    at the original weights (a model retrained without the forget set has about the same
    losses there). ``level`` (their median) is where a single example stops looking seen.
    """

    holdout_losses: torch.Tensor
    tolerance: float = 0.02
    mismatch_margin: float = 0.1

    def __post_init__(self) -> None:
        if not self.holdout_losses.numel():
            raise ValueError("the holdout is empty: a membership target needs held-out examples")
        if not 0.0 <= self.tolerance < 0.5:
            raise ValueError(f"tolerance must be in [0, 0.5), got {self.tolerance}")
        if not 0.0 <= self.mismatch_margin < 0.5:
            raise ValueError(f"mismatch_margin must be in [0, 0.5), got {self.mismatch_margin}")

    @property
    def level(self) -> float:
        return float(self.holdout_losses.median())

    @property
    def mean(self) -> float:
        return float(self.holdout_losses.mean())

    def auc(self, forget_losses: torch.Tensor) -> float:
        return loss_mia_auc(forget_losses.cpu().numpy(), self.holdout_losses.cpu().numpy())

    def describe(self) -> str:
        return (f"loss membership AUC of forget vs {self.holdout_losses.numel()} holdout examples <= "
                f"{0.5 + self.tolerance:.2f}")

    def mismatch_warning(self, auc: float) -> str:
        return (f"before any update the forget set looked less seen than the holdout (membership AUC {auc:.2f} < "
                f"{0.5 - self.mismatch_margin:.2f}): the holdout is not distributed like the forget set (e.g. clean "
                "held-out data for a request of mislabelled examples, whose losses stay high while the model fits "
                "them), so it cannot say when the forget set looks unseen. Ran the step budget instead; pass "
                "held-out examples of the forget set's kind (for mislabelled data: held-out examples whose labels "
                "were corrupted the same way)")



def example_losses(model, loader, loss_fn=None, *, device) -> torch.Tensor:
    """Per-example losses over a loader (in its order), without gradients, dropout off; with
    several processes each runs its share of the batches and every rank gets all the losses."""
    values, shard = [], RowShard(loader, lockstep=is_sharded(model))
    with torch.no_grad(), eval_mode(model):
        for batch in shard:
            values.append(per_example_losses(model, to_device(batch, device), loss_fn).float().cpu())
    values = shard.gather(values)
    return torch.cat(values) if values else torch.zeros(0)


def mean_loss(model, loader, loss_fn=None, *, device) -> float:
    """Mean per-example loss over a loader, without gradients, dropout off."""
    losses = example_losses(model, loader, loss_fn, device=device)
    return float(losses.sum()) / max(losses.numel(), 1)


def retain_budget(retain_before: float, tolerance: float) -> float:
    """The highest retain loss an update may reach: ``tolerance`` relative to the loss, and never
    less than ``tolerance`` x 0.1 nats absolute (a memorised retain set has a loss near 0)."""
    return retain_before + tolerance * max(abs(retain_before), 0.1)


def check_target(model, loader, target: "float | HoldoutTarget", *, loss_fn=None, device, step: int = 0,
                 known_mean: Optional[float] = None) -> dict:
    """One stopping check over the forget ``loader``: ``{"step", "forget_loss", "reached"}`` and,
    for a :class:`HoldoutTarget`, the membership ``"auc"``. ``known_mean`` spares the pass of a
    mean-loss target when the caller has just measured it."""
    if isinstance(target, HoldoutTarget):
        losses = example_losses(model, loader, loss_fn, device=device)
        auc = target.auc(losses)
        return {"step": step, "forget_loss": float(losses.mean()), "auc": auc, "reached": auc <= 0.5 + target.tolerance,
                "mismatched": step == 0 and auc < 0.5 - target.mismatch_margin}
    mean = known_mean if known_mean is not None else mean_loss(model, loader, loss_fn, device=device)
    return {"step": step, "forget_loss": mean, "reached": mean >= target}


def target_summary(target: "Optional[float | HoldoutTarget]") -> dict:
    """How the report describes a stopping target."""
    if target is None:
        return {"criterion": "none: the step budget"}
    if isinstance(target, HoldoutTarget):
        return {"criterion": target.describe(), "holdout_mean_loss": target.mean, "per_example_level": target.level}
    return {"criterion": f"mean forget loss >= {float(target):.4f}", "per_example_level": float(target)}


def target_mean(target: "Optional[float | HoldoutTarget]") -> Optional[float]:
    """The mean forget loss a target corresponds to (the holdout's mean loss for a HoldoutTarget)."""
    if target is None:
        return None
    return target.mean if isinstance(target, HoldoutTarget) else float(target)


def snapshot(params) -> list[torch.Tensor]:
    """Detached copies of ``params``, to :func:`restore` later."""
    return [p.detach().clone() for p in params]


def restore(params, kept: list[torch.Tensor]) -> None:
    """Copy a :func:`snapshot` back into ``params`` in place."""
    with torch.no_grad():
        for param, value in zip(params, kept):
            param.copy_(value)


class StepControl:
    """A trust region on the retain loss for the loop (``LoopMethod.step_control``): at each check
    the weights are accepted when the retain loss is within budget (then the step size doubles
    while the target is not reached) or rolled back to the last accepted weights with a halved
    step size and a fresh optimizer state, so the update never ends beyond the budget. The budget
    is relative to ``reference`` (default: the retain loss at construction).

    ``stalled`` turns true when a rollback happens at the lowest step size: even the smallest
    step leaves the budget, so further steps from the same weights only repeat the rollback (the
    loop stops there, at the last accepted weights, instead of spending the rest of its budget)."""

    def __init__(self, params, optimizer, retain_loss: Callable[[], float], *, tolerance: float,
                 lowest_lr: float, highest_lr: float, reference: Optional[float] = None):
        self.params, self.optimizer, self.retain_loss = params, optimizer, retain_loss
        self.budget = retain_budget(retain_loss() if reference is None else reference, tolerance)
        self.lowest, self.highest = lowest_lr, highest_lr
        self.accepted = snapshot(params)
        self.stalled = False

    def set_lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def after_check(self, check: dict, reached: bool) -> bool:
        """Accept or roll back; returns whether the target counts as reached."""
        retain = self.retain_loss()
        current = self.optimizer.param_groups[0]["lr"]
        check["retain_loss"] = retain
        if retain <= self.budget:
            self.accepted = snapshot(self.params)
            if not reached:
                self.set_lr(min(current * 2, self.highest))
            check["next_lr"] = self.optimizer.param_groups[0]["lr"]
            return reached
        restore(self.params, self.accepted)
        self.optimizer.state.clear()
        self.stalled = current <= self.lowest
        self.set_lr(max(current / 2, self.lowest))
        check.update(rolled_back=True, next_lr=self.optimizer.param_groups[0]["lr"])
        return False
