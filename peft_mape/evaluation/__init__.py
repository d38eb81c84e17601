"""Metrics that show whether an erasure worked (SPEC §8). Each works without the rest of the library.

- :mod:`.classification`: per-example losses / correctness / logits of a classifier; ROC-AUC.
- :mod:`.mia`: membership-inference scores and AUCs (LOSS, confidence, entropy; zlib, Min-K%).
- :mod:`.language_model`: per-token log-probabilities of a causal LM.
- :mod:`.suite`: forget / retain / test metrics of a model as one flat dict.
- :mod:`.relearning`: the relearning attack.
- :mod:`.curves`: successive-request curves; utility at matched forgetting along a trajectory.
- :mod:`.tofu`: TOFU metrics for question answering (answer probability, ROUGE-L, truth ratio,
  forget quality, model utility).
"""

from .classification import ClassifierOutputs, classifier_outputs, loss_mia_auc, membership_auc
from .curves import RequestCurve, split_into_requests, successive_request_curve, utility_at_forget_level
from .language_model import token_log_probs
from .mia import (
    classifier_mia_aucs, confidence_scores, entropy_scores, language_model_mia_aucs, loss_scores, min_k_prob,
    min_k_scores, perplexity, prediction_entropy, true_label_log_probs, zlib_ratio, zlib_ratio_scores,
)
from .relearning import RelearningResult, forget_set_metrics, relearning_attack, split_forget_set
from .suite import classification_metrics, language_model_metrics, metric_gaps
from .tofu import (
    SplitResult, answer_probability, evaluate_split, evaluate_splits, forget_quality, model_utility, normalised_answer_probability,
    rouge_l_recall, swapped_answers, tofu_summary, truth_ratio, truth_ratio_score, utility_metrics,
)

__all__ = [
    "ClassifierOutputs", "classifier_outputs", "loss_mia_auc", "membership_auc",
    "RequestCurve", "split_into_requests", "successive_request_curve", "utility_at_forget_level",
    "token_log_probs",
    "classifier_mia_aucs", "confidence_scores", "entropy_scores", "language_model_mia_aucs", "loss_scores",
    "min_k_prob", "min_k_scores", "perplexity", "prediction_entropy", "true_label_log_probs", "zlib_ratio",
    "zlib_ratio_scores",
    "RelearningResult", "forget_set_metrics", "relearning_attack", "split_forget_set",
    "classification_metrics", "language_model_metrics", "metric_gaps",
    "SplitResult", "answer_probability", "evaluate_split", "evaluate_splits", "forget_quality", "model_utility",
    "normalised_answer_probability", "rouge_l_recall", "swapped_answers", "tofu_summary", "truth_ratio",
    "truth_ratio_score", "utility_metrics",
]
