"""The unlearning algorithm over the tuner: one shared data object, public phases, one loop, and
the update rules in ``methods/`` (one file each)."""

from . import methods
from .methods import DEFAULT_METHOD, METHODS
from .phases import (
    MaskStatistics, Measurements, UpdateOutcome, adapter_to_fill, apply_selection, build_report, fixed_selection,
    mask_search, mask_statistics, measure, request_scope, update,
)
from .preparation import PhaseTimer, RunOptions, UnlearningData, holdout_target, prepare
from .unlearn import select_units, unlearn, unlearn_prepared

__all__ = ["methods", "METHODS", "DEFAULT_METHOD", "unlearn", "unlearn_prepared", "select_units", "prepare", "holdout_target",
           "RunOptions", "UnlearningData", "PhaseTimer", "mask_statistics", "mask_search", "fixed_selection",
           "apply_selection", "update", "measure", "build_report", "request_scope", "adapter_to_fill",
           "MaskStatistics", "Measurements", "UpdateOutcome"]
