"""The update rules of ``unlearn()``, one file each, and the registry that maps names to them.

``model.unlearn(forget, retain, method="npo", beta=0.5)`` and
``model.unlearn(forget, retain, method=NPO(beta=0.5, lr=1e-3))`` are the same call. A new rule
is a dataclass subclassing :class:`LoopMethod` (a ``loss``) or :class:`ClosedFormMethod` (a
``step``); :func:`register_method` makes it reachable by name.
"""

from .base import (
    METHODS, ClosedFormContext, ClosedFormMethod, LoopMethod, StepLosses, StepResult, UnlearningMethod, option_names,
    register_method, resolve_method,
)
# Registration order is the order of METHODS (the CLI's choices, compare.method_names()).
from .second_order import SecondOrder  # noqa: I001
from .gradient_ascent import GradientAscent
from .graddiff import GradDiff
from .npo import NPO
from .influence import Influence

DEFAULT_METHOD = "graddiff"

__all__ = ["METHODS", "DEFAULT_METHOD", "UnlearningMethod", "LoopMethod", "ClosedFormMethod", "StepLosses",
           "StepResult", "ClosedFormContext", "GradientAscent", "GradDiff", "NPO", "SecondOrder", "Influence",
           "register_method", "resolve_method", "option_names"]
