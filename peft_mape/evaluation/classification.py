"""Classification metrics: per-example losses and correctness, and membership-inference AUCs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..common.data import to_device
from ..common.membership import loss_mia_auc, membership_auc  # noqa: F401  (public here too)
from ..common.modes import eval_mode


@dataclass
class ClassifierOutputs:
    """Per-example cross-entropy losses and correctness of a classifier on one data set.

    ``logits`` and ``labels`` are kept for the logit-based membership attacks
    (:mod:`peft_mape.evaluation.mia`).
    """

    losses: np.ndarray
    correct: np.ndarray
    logits: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if self.correct.size else float("nan")


def classifier_outputs(model, loader, device=None) -> ClassifierOutputs:
    """Run a sequence classifier over ``loader`` (dict batches with ``labels``), dropout off."""
    device = device or next(model.parameters()).device
    losses, correct, all_logits, all_labels = [], [], [], []
    with torch.no_grad(), eval_mode(model):
        for batch in loader:
            batch = to_device(batch, device)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            losses.append(F.cross_entropy(logits, labels, reduction="none").cpu())
            correct.append((logits.argmax(-1) == labels).cpu())
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    return ClassifierOutputs(torch.cat(losses).numpy(), torch.cat(correct).numpy(),
                             torch.cat(all_logits).numpy(), torch.cat(all_labels).numpy())
