"""``UnlearningTrainer``: MAPE unlearning through ``transformers.Trainer`` (its distributed
back-ends, gradient accumulation, mixed precision, logging and checkpoints)."""

from .data import PairedCollator, PairedExamples
from .trainer import TargetStopping, UnlearningTrainer

__all__ = ["UnlearningTrainer", "TargetStopping", "PairedExamples", "PairedCollator"]
