"""What every update rule is: a documented dataclass of its options, and a loss or a closed-form step.

- :class:`LoopMethod` (defined beside the loop it runs in, :mod:`peft_mape.common.loop`):
  the shared optimisation loop asks the method for :meth:`LoopMethod.loss` of one step's
  per-example losses; the loop options (step size, step budget, clipping, the optional
  KL-to-original retain term) are fields of this base class, so every loop method has them.
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

from ...common.loop import LoopMethod, StepLosses, UnlearningMethod  # noqa: F401  (the loop's contract)


@dataclass
class ClosedFormContext:
    """What the update phase hands a closed-form step.

    ``tuner`` and ``adapter_name`` locate the deltas, ``params`` are them, ``data`` is the
    prepared :class:`peft_mape.unlearning.preparation.UnlearningData`, ``num_train_examples`` the
    training-set size behind the 1/n scale, ``target`` the request's stopping target or None.
    """

    tuner: Any
    adapter_name: str
    params: list
    data: Any
    num_train_examples: int
    target: Any = None  # the stopping target, when the request has one (holdout=)

    def forget_gradient_sum(self) -> list:
        """sum over the forget set of d loss / d delta, one tensor per selected delta."""
        from ..statistics import parameter_gradient_sum

        return parameter_gradient_sum(self.tuner, self.adapter_name, self.data.forget_loader, self.data.loss_fn,
                                      device=self.data.device, progress=self.data.progress)


@dataclass
class StepResult:
    """What a closed-form step reports: solver iterations, diagnostics and warnings for the report."""

    steps: int = 0
    diagnostics: dict = dataclasses.field(default_factory=dict)
    report_warnings: list = dataclasses.field(default_factory=list)


@dataclass
class ClosedFormMethod(UnlearningMethod):
    """An update rule that changes the selected deltas once, in closed form.

    Options shared by every closed-form method:
        num_train_examples: size of the original training set (the 1/n scale of the step);
            estimated as |forget| + |retain| when omitted, and the report says so.
        line_search: apply the computed step at the scale a line search picks
            (:mod:`peft_mape.unlearning.step_control`: the retain loss stays within
            ``retain_tolerance``; with a stopping target, the smallest scale that reaches it,
            up to ``max_scale``); ``False`` applies it at the specification's scale 1.
        retain_tolerance: relative rise of the retain loss a step may cause (at least
            ``retain_tolerance`` x 0.1 nats).
        max_scale: the longest scale tried, relative to the specification's step.
    """

    num_train_examples: Optional[int] = None
    line_search: bool = True
    retain_tolerance: float = 0.1
    max_scale: float = 4.0
    closed_form: ClassVar[bool] = True

    def apply(self, context: "ClosedFormContext", direction: list, forget_gradient_sum: list,
              result: Optional["StepResult"] = None) -> "StepResult":
        """Apply the computed ``direction`` (the step at scale 1) through the line search, or as is."""
        from ..step_control import scaled_step, step_warnings

        result = result or StepResult()
        if not self.line_search:
            with torch.no_grad():
                for param, step in zip(context.params, direction):
                    if not torch.isfinite(step).all():
                        raise FloatingPointError(f"the {self.name} step is not finite")
                    param.add_(step.to(param.dtype))
            return result
        search = scaled_step(context.params, direction, context.data, forget_gradient_sum=forget_gradient_sum,
                             target=context.target, retain_tolerance=self.retain_tolerance,
                             max_scale=self.max_scale if context.target is not None else min(self.max_scale, 1.0))
        result.diagnostics["line_search"] = search
        result.report_warnings.extend(step_warnings(search))
        return result

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
        if not self.retain_tolerance >= 0:
            raise ValueError(f"method '{self.name}': retain_tolerance must be >= 0, got {self.retain_tolerance}")
        if not self.max_scale > 0:
            raise ValueError(f"method '{self.name}': max_scale must be > 0, got {self.max_scale}")


METHODS: dict[str, type[UnlearningMethod]] = {}


def register_method(cls: type[UnlearningMethod]) -> type[UnlearningMethod]:
    """Make ``cls`` reachable as ``unlearn(method=cls.name)``; usable as a class decorator."""
    if not (isinstance(cls, type) and issubclass(cls, (LoopMethod, ClosedFormMethod))):
        raise TypeError(f"register_method expects a LoopMethod or ClosedFormMethod subclass, got {cls!r}")
    METHODS[cls.name] = cls
    return cls


def option_names(cls: type[UnlearningMethod]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def resolve_method(method, options: dict, default: str, other_options: tuple = ()) -> UnlearningMethod:
    """The method instance for ``method`` (a registered name, an instance, or None for ``default``)
    with ``options`` applied; an option the method does not have is a clear error, which also
    lists ``other_options`` (what the caller accepts beside the method's own)."""
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
        also = f"; options of every run: {', '.join(other_options)}" if other_options else ""
        raise ValueError(f"method '{cls.name}' has no option {', '.join(map(repr, unknown))}; its options are: "
                         f"{', '.join(option_names(cls))}{also}")
    return dataclasses.replace(base, **options) if base is not None else cls(**options)
