"""Metrics that show whether an erasure worked (SPEC §8). Each works without the rest of the library."""

from .classification import ClassifierOutputs, classifier_outputs, loss_mia_auc, membership_auc

__all__ = ["ClassifierOutputs", "classifier_outputs", "loss_mia_auc", "membership_auc"]
