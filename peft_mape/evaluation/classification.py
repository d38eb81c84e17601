"""Classification metrics: per-example losses and correctness, and membership-inference AUCs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from ..common.data import to_device
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


def membership_auc(member_scores, nonmember_scores) -> float:
    """ROC-AUC of telling members from non-members by a score (higher = more likely a member).

    0.5 means the attack cannot tell them apart: what a model that never saw the members gives.
    """
    member_scores = np.asarray(member_scores, dtype=np.float64).reshape(-1)
    nonmember_scores = np.asarray(nonmember_scores, dtype=np.float64).reshape(-1)
    if not member_scores.size or not nonmember_scores.size:
        raise ValueError(f"membership AUC needs members and non-members, got {member_scores.size} and "
                         f"{nonmember_scores.size} scores")
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(nonmember_scores))])
    return float(roc_auc_score(labels, np.concatenate([member_scores, nonmember_scores])))


def loss_mia_auc(member_losses, nonmember_losses) -> float:
    """LOSS attack (Yeom et al.): members have lower loss, so the score is the negated loss."""
    return membership_auc(-np.asarray(member_losses), -np.asarray(nonmember_losses))
