"""Update rules over a set of parameters (the deltas of the selected units, SPEC §4).

- :func:`second_order_step` (MAPE-SO): one closed-form influence step
  theta <- theta* + eta * (F_r + lambda)^-1 * sum_{x in D_f} grad l(x), with F_r the diagonal
  empirical Fisher on the retain sample and eta = 1/n_train.
- :func:`optimise`: the one optimisation loop; an :class:`UpdateLoss` (GA, GradDiff, NPO, and
  the optional KL-to-original retain term) says what to minimise from the per-example losses of
  a step. Early stopping when the mean forget loss reaches a target (e.g. the loss of held-out
  data).

The *reference* model of NPO and of the KL term is the model without the adapter being
trained (``reference()`` mutes it for one no-grad forward), never a second copy of the weights.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from tqdm.auto import tqdm

import torch.nn.functional as F

from .data import forward_with_losses, per_example_kl, per_example_losses, to_device
from .statistics import eval_mode


def second_order_step(params: Sequence[torch.nn.Parameter], forget_grad_sum: Sequence[torch.Tensor],
                      retain_fisher: Sequence[torch.Tensor], *, num_train_examples: int,
                      damping: float = 1e-3, scale: float = 1.0) -> float:
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


@dataclass
class StepLosses:
    """Per-example quantities of one step; the loop fills what the :class:`UpdateLoss` needs.

    ``forget_reference``: forget losses of the reference model (no gradient).
    ``retain_kl``: KL(reference || current) of the outputs on the retain batch.
    """

    forget: torch.Tensor
    retain: Optional[torch.Tensor] = None
    forget_reference: Optional[torch.Tensor] = None
    retain_kl: Optional[torch.Tensor] = None


class UpdateLoss(abc.ABC):
    """What one optimisation step minimises, from the step's per-example losses."""

    name = "loss"
    needs_retain = False
    needs_reference = False  # forget losses of the reference model
    needs_retain_kl = False

    @abc.abstractmethod
    def __call__(self, losses: StepLosses) -> torch.Tensor:
        """The scalar to minimise."""


class GradientAscent(UpdateLoss):
    """GA: maximise the forget loss."""

    name = "ga"

    def __call__(self, losses: StepLosses) -> torch.Tensor:
        return -losses.forget.mean()


@dataclass
class GradDiff(UpdateLoss):
    """GradDiff: maximise the forget loss while minimising the retain loss."""

    retain_weight: float = 1.0
    name = "graddiff"
    needs_retain = True

    def __call__(self, losses: StepLosses) -> torch.Tensor:
        return -losses.forget.mean() + self.retain_weight * losses.retain.mean()


@dataclass
class NPO(UpdateLoss):
    """Negative preference optimisation (Zhang et al. 2024), plus a retain loss when weighted.

    With per-example losses as negative log-likelihoods, log(pi/pi_ref) = loss_ref - loss, and
    NPO minimises (2/beta) * mean log(1 + (pi/pi_ref)^beta) = -(2/beta) logsigmoid(beta (loss - loss_ref)):
    GA whose push fades once an example's likelihood has dropped below the reference's.
    The default loss averages over answer tokens, so ``beta`` acts per token.
    """

    beta: float = 0.1
    retain_weight: float = 1.0
    name = "npo"
    needs_reference = True

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"npo_beta must be positive, got {self.beta}")

    @property
    def needs_retain(self) -> bool:
        return self.retain_weight > 0

    def __call__(self, losses: StepLosses) -> torch.Tensor:
        log_ratio_gap = losses.forget - losses.forget_reference
        objective = -(2.0 / self.beta) * F.logsigmoid(self.beta * log_ratio_gap).mean()
        if self.retain_weight > 0:
            objective = objective + self.retain_weight * losses.retain.mean()
        return objective


@dataclass
class WithRetainKL(UpdateLoss):
    """Any update loss plus ``weight`` x KL(reference || current) on the retain batch."""

    inner: UpdateLoss
    weight: float = 1.0
    needs_retain_kl = True
    needs_retain = True

    @property
    def name(self) -> str:
        return f"{self.inner.name}+kl"

    @property
    def needs_reference(self) -> bool:
        return self.inner.needs_reference

    def __call__(self, losses: StepLosses) -> torch.Tensor:
        return self.inner(losses) + self.weight * losses.retain_kl.mean()


@dataclass
class LoopResult:
    steps: int = 0
    stopped_early: bool = False
    forget_loss_trace: list[float] = field(default_factory=list)


def mean_loss(model, loader, loss_fn=None, *, device) -> float:
    """Mean per-example loss over a loader, without gradients, dropout off."""
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(model):
        for batch in loader:
            batch = to_device(batch, device)
            losses = per_example_losses(model, batch, loss_fn)
            total += float(losses.sum())
            count += losses.numel()
    return total / max(count, 1)


def optimise(model, params: Sequence[torch.nn.Parameter], update_loss: UpdateLoss, forget_loader, retain_loader=None,
             *, device, loss_fn=None, lr: float, max_steps: int, forget_loss_target: Optional[float] = None,
             eval_every: int = 5, max_grad_norm: float = 1.0, progress: bool = True,
             on_step: Optional[Callable[[int], None]] = None,
             initial_forget_loss: Optional[float] = None,
             reference: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
             check_loader=None) -> LoopResult:
    """Minimise ``update_loss`` over ``params`` with Adam; stop at ``forget_loss_target`` if given.

    ``initial_forget_loss`` spares the first check's pass when the caller has just measured it.
    ``check_loader`` serves the stopping checks (default ``forget_loader``, whose batches train):
    the same examples, batched for a no-grad pass.
    ``reference()`` returns a context in which the model computes the reference (original)
    outputs; NPO and the KL term need it.
    """
    if update_loss.needs_retain and retain_loader is None:
        raise ValueError(f"method '{update_loss.name}' needs a retain set")
    if (update_loss.needs_reference or update_loss.needs_retain_kl) and reference is None:
        raise ValueError(f"method '{update_loss.name}' needs a reference model context")
    params = list(params)
    optimizer = torch.optim.Adam(params, lr=lr)
    forget_batches = itertools.cycle(forget_loader)
    retain_batches = itertools.cycle(retain_loader) if update_loss.needs_retain else None
    result = LoopResult()
    check_loader = forget_loader if check_loader is None else check_loader
    if forget_loss_target is not None:
        current = initial_forget_loss
        if current is None:
            current = mean_loss(model, check_loader, loss_fn, device=device)
        result.forget_loss_trace.append(current)
        if current >= forget_loss_target:  # already looks unseen: nothing to undo
            result.stopped_early = True
            return result
    bar = tqdm(total=max_steps, desc=f"update ({update_loss.name})", disable=not progress, leave=False)
    with eval_mode(model):
        for step in range(1, max_steps + 1):
            forget_batch = to_device(next(forget_batches), device)
            losses = StepLosses(forget=per_example_losses(model, forget_batch, loss_fn))
            if update_loss.needs_reference:
                with torch.no_grad(), reference():
                    losses.forget_reference = per_example_losses(model, forget_batch, loss_fn)
            if retain_batches is not None:
                retain_batch = to_device(next(retain_batches), device)
                outputs, losses.retain = forward_with_losses(model, retain_batch, loss_fn,
                                                             need_outputs=update_loss.needs_retain_kl)
                if update_loss.needs_retain_kl:
                    with torch.no_grad(), reference():
                        reference_logits = model(**retain_batch).logits
                    losses.retain_kl = per_example_kl(reference_logits, outputs.logits, retain_batch)
            objective = update_loss(losses)
            if not torch.isfinite(objective):
                raise FloatingPointError(f"non-finite {update_loss.name} objective at step {step}")
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            result.steps = step
            bar.update(1)
            if on_step is not None:
                on_step(step)
            if forget_loss_target is not None and (step % eval_every == 0 or step == max_steps):
                current = mean_loss(model, check_loader, loss_fn, device=device)
                result.forget_loss_trace.append(current)
                bar.set_postfix(forget_loss=f"{current:.3f}", target=f"{forget_loss_target:.3f}")
                if current >= forget_loss_target:
                    result.stopped_early = True
                    break
    bar.close()
    optimizer.zero_grad(set_to_none=True)
    return result
