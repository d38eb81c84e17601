"""Membership scores: how well a simple attack tells examples a model trained on from unseen ones.

One implementation serves the evaluation suite (MIA AUCs of a finished model) and the update
loop (stopping once the forget set is indistinguishable from held-out data).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


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
    return membership_auc(-np.asarray(member_losses, dtype=np.float64), -np.asarray(nonmember_losses,
                                                                                   dtype=np.float64))
