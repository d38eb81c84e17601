"""The one optimisation loop: Adam over a set of parameters, minimising a :class:`LoopMethod`'s loss.

Every loop-based update in the library runs here: GA / GradDiff / NPO on MAPE deltas, the
SalUn and LoRA baselines, retraining and the relearning attack (:class:`Descent`). The loop
stops early once the forget set's mean loss reaches ``target`` (e.g. the loss of held-out
data: the forget set then looks unseen).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .data import forward_with_losses, per_example_kl, per_example_losses, to_device
from .modes import eval_mode

@dataclass
class StepLosses:
    """Per-example quantities of one optimisation step; the loop fills what the method needs.

    ``forget_reference``: forget losses of the reference model (this adapter muted, no gradient).
    ``retain_kl``: KL(reference || current) of the outputs on the retain batch.
    """

    forget: torch.Tensor
    retain: Optional[torch.Tensor] = None
    forget_reference: Optional[torch.Tensor] = None
    retain_kl: Optional[torch.Tensor] = None


@dataclass
class UnlearningMethod(abc.ABC):
    """Base of every update rule. ``name`` is the registry name and the report's ``method``."""

    name: ClassVar[str] = "method"
    closed_form: ClassVar[bool] = False

    @property
    def needs_retain(self) -> bool:
        """Whether the method reads retain batches (then ``unlearn()`` requires a retain set)."""
        return False

    def __post_init__(self) -> None:
        self.validate()  # a bad option fails where the method is made, before any work

    def options(self) -> dict[str, Any]:
        """The method's options and their values, as recorded in the report."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid option."""


@dataclass
class LoopMethod(UnlearningMethod):
    """An update rule run by the shared optimisation loop: Adam on the selected deltas.

    Options shared by every loop method:
        lr: Adam's step size; ``None`` picks 2e-4 on selected units and 1e-5 with
            ``selection="all"`` (full-parameter updates need a smaller step: paper and
            open-unlearning; 1e-3 on the selected units cost ~17 test points in 5 steps on the
            tweets demo).
        max_steps: the step budget when no stopping target is reached first.
        eval_every: steps between checks of the stopping target.
        max_grad_norm: gradient-norm clipping.
        kl_weight: adds ``kl_weight`` x KL(original || current) on retain batches, the original
            being the model with this adapter muted (no second copy of the weights).
    """

    lr: Optional[float] = None
    max_steps: int = 100
    eval_every: int = 5
    max_grad_norm: float = 1.0
    kl_weight: float = 0.0

    # Forget losses of the reference model (this adapter muted) are computed for the loss.
    needs_reference: ClassVar[bool] = False
    masked_lr: ClassVar[float] = 2e-4
    full_parameter_lr: ClassVar[float] = 1e-5

    @property
    def needs_retain(self) -> bool:
        return self.kl_weight > 0

    @abc.abstractmethod
    def loss(self, losses: StepLosses) -> torch.Tensor:
        """The scalar one step minimises, from the step's per-example losses."""

    def objective(self, losses: StepLosses) -> torch.Tensor:
        """:meth:`loss` plus the optional KL retain term."""
        value = self.loss(losses)
        if self.kl_weight > 0:
            value = value + self.kl_weight * losses.retain_kl.mean()
        return value

    def step_size(self, full_parameter: bool) -> float:
        if self.lr is not None:
            return self.lr
        return self.full_parameter_lr if full_parameter else self.masked_lr

    def validate(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"method '{self.name}': lr must be > 0 (or None for the default), got {self.lr}")
        for option, value, minimum in (("max_steps", self.max_steps, 0), ("eval_every", self.eval_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"method '{self.name}': {option} must be an integer >= {minimum}, got {value!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"method '{self.name}': max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.kl_weight < 0:
            raise ValueError(f"method '{self.name}': kl_weight must be >= 0, got {self.kl_weight}")



@dataclass
class Descent(LoopMethod):
    """Plain descent on the mean loss of the loop's "forget" batches (fine-tuning: retraining,
    the relearning attack)."""

    name = "descent"

    def loss(self, losses: StepLosses) -> torch.Tensor:
        return losses.forget.mean()


@dataclass
class LoopData:
    """The batches one run of the loop reads.

    ``forget``: the batches the loss calls "forget" (cycled); ``retain``: shuffled retain batches
    (cycled, read when the method needs them); ``check``: the forget set batched for the no-grad
    stopping checks (default ``forget``).
    """

    forget: Any
    retain: Any = None
    check: Any = None
    loss_fn: Optional[Callable] = None
    device: Any = "cpu"
    progress: bool = True


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


def optimise(model, params: Sequence[torch.nn.Parameter], method: LoopMethod, data: LoopData, *, lr: float,
             target: Optional[float] = None, initial_forget_loss: Optional[float] = None,
             reference: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
             on_step: Optional[Callable[[int], None]] = None) -> LoopResult:
    """Minimise ``method.objective`` over ``params`` with Adam for at most ``method.max_steps``
    steps; stop once the forget loss reaches ``target`` (checked every ``method.eval_every``).

    ``initial_forget_loss`` spares the first check's pass when the caller has just measured it.
    ``reference()`` returns a context in which the model computes the reference (original)
    outputs; NPO and the KL term need it.
    """
    needs_retain_kl = method.kl_weight > 0
    if method.needs_retain and data.retain is None:
        raise ValueError(f"method '{method.name}' needs a retain set")
    if (method.needs_reference or needs_retain_kl) and reference is None:
        raise ValueError(f"method '{method.name}' needs a reference model context")
    params = list(params)
    optimizer = torch.optim.Adam(params, lr=lr)
    forget_batches = itertools.cycle(data.forget)
    retain_batches = itertools.cycle(data.retain) if method.needs_retain else None
    result = LoopResult()
    check = data.forget if data.check is None else data.check
    device, loss_fn = data.device, data.loss_fn
    if target is not None:
        current = initial_forget_loss
        if current is None:
            current = mean_loss(model, check, loss_fn, device=device)
        result.forget_loss_trace.append(current)
        if current >= target:  # already looks unseen: nothing to undo
            result.stopped_early = True
            return result
    max_steps = method.max_steps
    bar = tqdm(total=max_steps, desc=f"update ({method.name})", disable=not data.progress, leave=False)
    with eval_mode(model):
        for step in range(1, max_steps + 1):
            forget_batch = to_device(next(forget_batches), device)
            losses = StepLosses(forget=per_example_losses(model, forget_batch, loss_fn))
            if method.needs_reference:
                with torch.no_grad(), reference():
                    losses.forget_reference = per_example_losses(model, forget_batch, loss_fn)
            if retain_batches is not None:
                retain_batch = to_device(next(retain_batches), device)
                outputs, losses.retain = forward_with_losses(model, retain_batch, loss_fn,
                                                             need_outputs=needs_retain_kl)
                if needs_retain_kl:
                    with torch.no_grad(), reference():
                        reference_logits = model(**retain_batch).logits
                    losses.retain_kl = per_example_kl(reference_logits, outputs.logits, retain_batch)
            objective = method.objective(losses)
            if not torch.isfinite(objective):
                raise FloatingPointError(f"non-finite {method.name} objective at step {step}")
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            torch.nn.utils.clip_grad_norm_(params, method.max_grad_norm)
            optimizer.step()
            result.steps = step
            bar.update(1)
            if on_step is not None:
                on_step(step)
            if target is not None and (step % method.eval_every == 0 or step == max_steps):
                current = mean_loss(model, check, loss_fn, device=device)
                result.forget_loss_trace.append(current)
                bar.set_postfix(forget_loss=f"{current:.3f}", target=f"{target:.3f}")
                if current >= target:
                    result.stopped_early = True
                    break
    bar.close()
    optimizer.zero_grad(set_to_none=True)
    return result
