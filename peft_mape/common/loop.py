"""The one optimisation loop: Adam over a set of parameters, minimising a :class:`LoopMethod`'s loss.

Every loop-based update in the library runs here: GA / GradDiff / NPO on MAPE deltas, the
SalUn and LoRA baselines, retraining and the relearning attack (:class:`Descent`). The loop
stops early once the forget set looks unseen (a target of :mod:`.stopping`) and, with a target,
keeps the retain loss within a trust region (:class:`~.stopping.StepControl`).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Sequence

import torch
from tqdm.auto import tqdm

from .distributed import is_dtensor, is_sharded, sum_across, world_size
from .step_losses import StepLosses, step_losses
from .modes import eval_mode
from .stopping import HoldoutTarget, StepControl, check_target, mean_loss, restore, snapshot, target_summary


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
        max_steps: the step budget when no stopping target is reached first; ``None`` picks
            300 with a target and 100 without. With a target, 100 ended most task-matrix runs
            before the target or the retain budget did; without one the budget is the only
            stop, and 100 steps already took a random request of MiniLM tweets past the
            retrained model (forget accuracy 40% vs 69%, test -8 points), so it stays short.
        eval_every: steps between checks of the stopping target.
        max_grad_norm: gradient-norm clipping.
        kl_weight: adds ``kl_weight`` x KL(original || current) on retain batches, the original
            being the model with this adapter muted (no second copy of the weights).
        per_example_cap: with a stopping target, an example whose loss already reached the
            target's level stops being pushed (its weight in the forget term is 0), so the push
            goes to the examples still memorised instead of making forgotten ones ever worse;
            ``False`` gives the plain method.
        step_control: a trust region on the retain loss (no-grad, on the report's retain
            sample), checked every ``eval_every`` steps: weights whose retain loss is beyond
            ``retain_tolerance`` of where it started are rolled back to the last accepted ones
            and the step size halves (down to ``lr`` / 8; a rollback there ends the loop). With
            a stopping target the step also doubles while the target is not reached and the
            retain loss holds (up to ``lr`` x ``max_lr_growth``), so one default ``lr`` serves
            models whose weights and losses differ in scale. Without a target it never grows:
            nothing would say when to stop, and growing until the retain budget binds
            over-forgets random requests.
        settle: with a stopping target and the step control, once the target is reached the
            loop goes on while it stays reached and the retain loss falls at each check, and
            ends on the last such weights: the ascent acts at once, the retain term's repair
            lags, so the first check that reaches the target catches the retain loss high.
        retain_tolerance: relative rise of the retain loss the step control allows (at least
            ``retain_tolerance`` x 0.1 nats, see :func:`retain_budget`).
        max_lr_growth: the largest factor the step control may raise ``lr`` by.
    """

    lr: Optional[float] = None
    max_steps: Optional[int] = None
    eval_every: int = 5
    max_grad_norm: float = 1.0
    kl_weight: float = 0.0
    per_example_cap: bool = True
    step_control: bool = True
    settle: bool = True
    retain_tolerance: float = 1.0
    max_lr_growth: float = 64.0

    # Forget losses of the reference model (this adapter muted) are computed for the loss.
    needs_reference: ClassVar[bool] = False
    steps_with_target: ClassVar[int] = 300
    steps_without_target: ClassVar[int] = 100
    masked_lr: ClassVar[float] = 2e-4
    full_parameter_lr: ClassVar[float] = 1e-5

    @property
    def needs_retain(self) -> bool:
        return self.kl_weight > 0

    @abc.abstractmethod
    def loss(self, losses: StepLosses) -> torch.Tensor:
        """The scalar one step minimises, from the step's per-example losses."""

    def forget_weights(self, losses: StepLosses) -> torch.Tensor:
        """1 for the forget examples of the batch that are still pushed, 0 for those already at
        the target's level (all 1 without a target or with ``per_example_cap=False``)."""
        if not self.per_example_cap or losses.forget_cap is None:
            return torch.ones_like(losses.forget)
        return (losses.forget.detach() < losses.forget_cap).to(losses.forget.dtype)

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

    def step_budget(self, with_target: bool) -> int:
        """``max_steps``, or its default for a run with or without a stopping target."""
        if self.max_steps is not None:
            return self.max_steps
        return self.steps_with_target if with_target else self.steps_without_target

    def validate(self) -> None:
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"method '{self.name}': lr must be > 0 (or None for the default), got {self.lr}")
        for option, value, minimum in (("max_steps", self.max_steps, 0), ("eval_every", self.eval_every, 1)):
            if option == "max_steps" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"method '{self.name}': {option} must be an integer >= {minimum}, got {value!r}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"method '{self.name}': max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.kl_weight < 0:
            raise ValueError(f"method '{self.name}': kl_weight must be >= 0, got {self.kl_weight}")
        if not self.retain_tolerance >= 0:
            raise ValueError(f"method '{self.name}': retain_tolerance must be >= 0, got {self.retain_tolerance}")
        if not self.max_lr_growth >= 1:
            raise ValueError(f"method '{self.name}': max_lr_growth must be >= 1, got {self.max_lr_growth}")



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
    stopping checks (default ``forget``); ``retain_check``: retain batches for the step control's
    no-grad retain loss (none: no step control); ``retain_view()``: the context in which that
    retain loss is measured (a memory-aided request measures it with the earlier requests' deltas
    applied, so their sum stays inside the trust region); ``retain_reference``: the retain loss the
    trust region's budget is relative to (default: the loss when the run starts; a memory-aided
    request passes the original model's, so all requests together stay within one budget);
    ``on_check(record)``: called at each
    check with the weights just checked, a returned dict merged into the record (see
    ``RunOptions.on_check``); the loop then checks even without a target or trust region.
    """

    forget: Any
    retain: Any = None
    check: Any = None
    retain_check: Any = None
    retain_view: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    retain_reference: Optional[float] = None
    loss_fn: Optional[Callable] = None
    device: Any = "cpu"
    progress: bool = True
    on_check: Optional[Callable[[dict], Optional[dict]]] = None


@dataclass
class LoopResult:
    """What a run of the loop did: ``checks`` holds one entry per stopping check (step, mean
    forget loss, and the membership AUC with a :class:`HoldoutTarget`); ``stop_reason`` says why
    it ended."""

    steps: int = 0
    stopped_early: bool = False
    forget_loss_trace: list[float] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    stop_reason: str = ""
    warnings: list[str] = field(default_factory=list)
    retain_loss_budget: Optional[float] = None  # the step control's trust region, when it ran

    def stopping(self, target) -> dict:
        """The report's account of the stopping: criterion, every check, and why the loop ended."""
        out = dict(target_summary(target), checks=self.checks, stop_reason=self.stop_reason)
        if self.retain_loss_budget is not None:
            out["retain_loss_budget"] = self.retain_loss_budget
            if target is None:
                out["criterion"] = "none: the step budget, at a fixed step size under the retain-loss trust region"
        return out


def _record(result: LoopResult, check: dict, on_check: Optional[Callable[[dict], Optional[dict]]] = None) -> bool:
    record = {k: v for k, v in check.items() if k not in ("reached", "mismatched")}
    if on_check is not None:
        record.update(on_check(dict(record)) or {})
    result.checks.append(record)
    result.forget_loss_trace.append(check["forget_loss"])
    return check["reached"]


def _settled_reason(settling: dict) -> str:
    if settling["step"] == settling["reached_at"]:
        return f"target reached at step {settling['reached_at']} (the retain loss did not fall after it)"
    return (f"target reached at step {settling['reached_at']}; the retain loss then fell while the target held, "
            f"until step {settling['step']} (retain loss {settling['retain_loss']:.4f}): stopped there")


def optimise(model, params: Sequence[torch.nn.Parameter], method: LoopMethod, data: LoopData, *, lr: float,
             target: "Optional[float | HoldoutTarget]" = None, initial_check: Optional[dict] = None,
             reference: Optional[Callable[[], contextlib.AbstractContextManager]] = None,
             on_step: Optional[Callable[[int], None]] = None) -> LoopResult:
    """Minimise ``method.objective`` over ``params`` with Adam for at most ``method.max_steps``
    steps; stop once ``target`` is reached (checked every ``method.eval_every``): a
    :class:`HoldoutTarget`, or a mean forget loss.

    ``initial_check`` (a :func:`check_target` result at the current weights) spares the first
    check's pass when the caller has just made it.
    ``reference()`` returns a context in which the model computes the reference (original)
    outputs; NPO and the KL term need it.
    """
    needs_retain_kl = method.kl_weight > 0
    if method.needs_retain and data.retain is None:
        raise ValueError(f"method '{method.name}' needs a retain set")
    if (method.needs_reference or needs_retain_kl) and reference is None:
        raise ValueError(f"method '{method.name}' needs a reference model context")
    params = list(params)
    sharded = is_sharded(model)
    optimizer = torch.optim.Adam(params, lr=lr)
    forget_batches = itertools.cycle(data.forget)
    retain_batches = itertools.cycle(data.retain) if method.needs_retain else None
    result = LoopResult()
    check = data.forget if data.check is None else data.check
    device, loss_fn = data.device, data.loss_fn
    cap = None
    if target is not None:
        cap = target.level if isinstance(target, HoldoutTarget) else float(target)
        first = initial_check or check_target(model, check, target, loss_fn=loss_fn, device=device)
        if first.get("mismatched"):
            _record(result, first, data.on_check)
            result.warnings.append(target.mismatch_warning(first["auc"]))
            target = cap = None
        elif _record(result, first, data.on_check):
            result.stopped_early, result.stop_reason = True, "the forget set already looked unseen: no step"
            return result
    # Without a target the trust region still guards the retain loss, but the step never grows:
    # growing until the retain budget binds over-forgets (a random request of MiniLM tweets went
    # to 22% forget accuracy against the retrained model's 69%, test -11 points).
    controlled = method.step_control and data.retain_check is not None
    if controlled:
        def retain_loss() -> float:
            with data.retain_view():
                return mean_loss(model, data.retain_check, loss_fn, device=device)

        control = StepControl(params, optimizer, retain_loss, reference=data.retain_reference,
                              tolerance=method.retain_tolerance, lowest_lr=lr / 8,
                              highest_lr=lr if target is None else lr * method.max_lr_growth)
        result.retain_loss_budget = control.budget
    settling = None  # after the target is reached: the last weights that kept it with a lower retain loss
    max_steps = method.step_budget(target is not None)
    bar = tqdm(total=max_steps, desc=f"update ({method.name})", disable=not data.progress, leave=False)
    with eval_mode(model):
        for step in range(1, max_steps + 1):
            losses, stand_in = step_losses(model, method, next(forget_batches),
                                           next(retain_batches) if retain_batches is not None else None,
                                           loss_fn=loss_fn, device=device, reference=reference, lockstep=sharded)
            losses.forget_cap = cap
            objective = method.objective(losses)
            if not torch.isfinite(objective):
                raise FloatingPointError(f"non-finite {method.name} objective at step {step}")
            optimizer.zero_grad(set_to_none=True)
            differentiated = objective if stand_in is None else objective + stand_in
            if sharded:  # FSDP2's reduce-scatter averages; each rank's backward holds a part of the sum
                differentiated = differentiated * world_size()
            if differentiated.requires_grad or world_size() == 1:  # a rank may hold no rows of this batch
                differentiated.backward()
            if world_size() > 1:  # each rank's backward gave its rows' part of the global gradient
                for param in params:
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                # FSDP2's reduce-scatter has reduced the sharded ones; the others are summed here
                sum_across([param.grad for param in params if not (sharded and is_dtensor(param))])
            torch.nn.utils.clip_grad_norm_(params, method.max_grad_norm)
            optimizer.step()
            result.steps = step
            bar.update(1)
            if on_step is not None:
                on_step(step)
            checking = target is not None or controlled or data.on_check is not None
            if checking and (step % method.eval_every == 0 or step == max_steps):
                reached = _record(result, check_target(model, check, math.inf if target is None else target,
                                                       loss_fn=loss_fn, device=device, step=step), data.on_check)
                if controlled:
                    reached = control.after_check(result.checks[-1], reached)
                    if settling is not None:
                        retain = result.checks[-1]["retain_loss"]
                        # A rollback, stalled or not, never counts as reached.
                        if reached and retain < settling["retain_loss"]:
                            settling.update(retain_loss=retain, step=step, weights=snapshot(params))
                            continue
                        restore(params, settling["weights"])
                        result.stopped_early = True
                        result.stop_reason = _settled_reason(settling)
                        break
                    if control.stalled:
                        result.stopped_early = True
                        result.stop_reason = (f"the retain-loss budget binds at the smallest step size (step {step}): "
                                              "stopped at the last accepted weights" +
                                              ("" if target is None else " before the target was reached"))
                        break
                if reached and controlled and method.settle:
                    settling = {"reached_at": step, "step": step, "retain_loss": result.checks[-1]["retain_loss"],
                                "weights": snapshot(params)}
                    continue
                if reached:
                    result.stopped_early, result.stop_reason = True, f"target reached at step {step}"
                    break
    if settling is not None and not result.stop_reason:
        result.stop_reason = _settled_reason(settling)
    if not result.stop_reason:
        result.stop_reason = f"step budget ({max_steps}) used" + ("" if target is None else
                                                                  " before the target was reached")
    bar.close()
    optimizer.zero_grad(set_to_none=True)
    return result
