"""The update rules of ``unlearn()`` (public home: :mod:`peft_mape.unlearning.methods`)."""

from .unlearning.methods import *  # noqa: F401,F403
from .unlearning.methods import __all__  # noqa: F401
