"""What every update rule is: a documented dataclass of its options, and a loss or a closed-form step.

- :class:`LoopMethod`: the shared optimisation loop (:func:`peft_mape.unlearning.loop.optimise`)
  asks the method for :meth:`LoopMethod.loss` of one step's per-example losses; the loop options
  (step size, step budget, clipping, the optional KL-to-original retain term) are fields of this
  base class, so every loop method has them.
- :class:`ClosedFormMethod`: :meth:`ClosedFormMethod.step` changes the selected deltas once, from
  statistics the update phase hands it (:class:`ClosedFormContext`).

A method plugs in by subclassing either and being passed as ``unlearn(method=MyMethod(...))``;
:func:`register_method` also makes it reachable by name.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch


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
class ClosedFormContext:
    """What the update phase hands a closed-form step.

    ``tuner`` and ``adapter_name`` locate the deltas, ``params`` are them, ``data`` is the
    prepared :class:`peft_mape.unlearning.data.UnlearningData`, ``num_train_examples`` the
    training-set size behind the 1/n scale.
    """

    tuner: Any
    adapter_name: str
    params: list
    data: Any
    num_train_examples: int


@dataclass
class StepResult:
    """What a closed-form step reports: solver iterations, diagnostics and notes for the report."""

    steps: int = 0
    diagnostics: dict = dataclasses.field(default_factory=dict)
    notes: list = dataclasses.field(default_factory=list)


@dataclass
class ClosedFormMethod(UnlearningMethod):
    """An update rule that changes the selected deltas once, in closed form.

    Options shared by every closed-form method:
        num_train_examples: size of the original training set (the 1/n scale of the step);
            estimated as |forget| + |retain| when omitted, and the report says so.
    """

    num_train_examples: Optional[int] = None
    closed_form: ClassVar[bool] = True

    @property
    def needs_retain(self) -> bool:
        return True

    @abc.abstractmethod
    def step(self, context: ClosedFormContext) -> StepResult:
        """Change ``context.params`` in place."""

    def validate(self) -> None:
        if self.num_train_examples is not None and not self.num_train_examples > 0:
            raise ValueError(f"method '{self.name}': num_train_examples must be positive, got "
                             f"{self.num_train_examples}")


METHODS: dict[str, type[UnlearningMethod]] = {}


def register_method(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    """Make ``cls`` reachable as ``unlearn(method=cls.name)``; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, (LoopMethod, ClosedFormMethod))):
        raise TypeError(f"register_method expects a LoopMethod or ClosedFormMethod subclass, got {cls!r}")
    METHODS[cls.name] = cls
    return cls


def option_names(cls: type[UnlearningMethod]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def resolve_method(method, options: dict, default: str) -> UnlearningMethod:
    """The method instance for ``method`` (a registered name, an instance, or None for ``default``)
    with ``options`` applied; an option the method does not have is a clear error."""
    if method is None:
        method = default
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(f"unknown unlearning method {method!r}; choose one of {sorted(METHODS)} "
                             "or pass a method instance (peft_mape.methods)")
        cls, base = METHODS[method], None
    elif isinstance(method, (LoopMethod, ClosedFormMethod)):
        cls, base = type(method), method
    else:
        raise TypeError(f"method must be a name ({sorted(METHODS)}) or a LoopMethod/ClosedFormMethod instance, "
                        f"got {type(method).__name__}")
    unknown = sorted(set(options) - set(option_names(cls)))
    if unknown:
        raise ValueError(f"method '{cls.name}' has no option {', '.join(map(repr, unknown))}; its options are: "
                         f"{', '.join(option_names(cls))}")
    return dataclasses.replace(base, **options) if base is not None else cls(**options)
