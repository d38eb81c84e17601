"""Membership-inference attacks (MIAs) as ROC-AUC of forget-set vs held-out examples (SPEC §8).

Every attack turns a per-example quantity into a *membership score* (higher = more likely a
training member) and reports the ROC-AUC of telling the forget set (members before unlearning)
from held-out data. 0.5 means the attacker cannot tell them apart — what a model retrained
without the forget set should give; 1.0 means the forget set is perfectly recognisable.

Classifiers (from per-example losses or logits):

- LOSS (Yeom et al. 2018): members have lower loss; score = -loss.
- confidence: the top softmax probability (label-free); score = max_c p(c | x).
- entropy: members get sharper predictions; score = -H(softmax(logits)).

Language models (from per-token log-probabilities of the scored tokens, and the text):

- zlib ratio (Carlini et al. 2021): log-perplexity normalised by the text's zlib-compressed
  length, so that low-entropy (repetitive) text is not mistaken for memorised text;
  score = mean log-prob / zlib bytes.
- Min-K% prob (Shi et al. 2024): the mean of the k% lowest token log-probabilities; members
  have fewer surprising tokens; score = that mean.

Inputs are numpy arrays, lists or torch tensors; no model or other part of the library is needed.
"""

from __future__ import annotations

import math
import zlib
from typing import Iterable, Sequence

import numpy as np
from scipy.special import log_softmax

from .classification import membership_auc

__all__ = [
    "loss_scores", "confidence_scores", "entropy_scores", "prediction_entropy", "zlib_ratio_scores",
    "zlib_ratio", "min_k_prob", "min_k_scores", "classifier_mia_aucs", "language_model_mia_aucs",
    "true_label_log_probs", "perplexity",
]


def _array(values, what: str, ndim: int | None = None) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensors, without importing torch here
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{what} must be a {ndim}-D array, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contains NaN or inf")
    return array


def loss_scores(losses) -> np.ndarray:
    """LOSS attack scores: the negated per-example loss."""
    return -_array(losses, "losses", ndim=1)


def true_label_log_probs(logits, labels) -> np.ndarray:
    """log softmax(logits)[label] per row: the negated cross-entropy loss of each example."""
    logits = _array(logits, "logits", ndim=2)
    labels = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach") else labels)
    if labels.shape != (logits.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({logits.shape[0]},), got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise ValueError(f"labels must lie in 0..{logits.shape[1] - 1}, got {labels.min()}..{labels.max()}")
    return log_softmax(logits, axis=1)[np.arange(len(labels)), labels]


def confidence_scores(logits) -> np.ndarray:
    """Confidence attack scores: the top softmax probability of each row (Salem et al. 2019).

    Label-free on purpose: the probability of the *true* label is exp(-loss), which ranks
    examples exactly like the LOSS attack and would add nothing.
    """
    return np.exp(log_softmax(_array(logits, "logits", ndim=2), axis=1).max(axis=1))


def prediction_entropy(logits) -> np.ndarray:
    """Shannon entropy (nats) of each row's softmax distribution."""
    log_p = log_softmax(_array(logits, "logits", ndim=2), axis=1)
    return -(np.exp(log_p) * log_p).sum(axis=1)


def entropy_scores(logits) -> np.ndarray:
    """Entropy attack scores: the negated prediction entropy (sharper = more member-like)."""
    return -prediction_entropy(logits)


def min_k_prob(token_log_probs, k: float = 0.2) -> float:
    """Mean of the ``k`` fraction lowest token log-probabilities of one text (Min-K% prob).

    At least one token is always used (the reference implementation's ``int(n * k)`` would be 0
    for short texts).
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    values = _array(token_log_probs, "token log-probs", ndim=1)
    if values.size == 0:
        raise ValueError("Min-K% prob needs at least one scored token")
    count = max(1, int(values.size * k))
    return float(np.sort(values)[:count].mean())


def min_k_scores(token_log_probs: Iterable[Sequence[float]], k: float = 0.2) -> np.ndarray:
    """Min-K% prob of each text (a list of per-token log-prob arrays)."""
    return np.array([min_k_prob(lp, k) for lp in token_log_probs])


def zlib_ratio(token_log_probs, text: str) -> float:
    """Mean token log-prob divided by the zlib-compressed length (bytes) of ``text``.

    This is -log(perplexity) / zlib entropy, Carlini et al.'s ratio with the sign flipped so that
    higher means more member-like.
    """
    values = _array(token_log_probs, "token log-probs", ndim=1)
    if values.size == 0:
        raise ValueError("the zlib ratio needs at least one scored token")
    if not isinstance(text, str) or not text:
        raise ValueError("the zlib ratio needs the non-empty text of the example")
    return float(values.mean() / len(zlib.compress(text.encode("utf-8"))))


def zlib_ratio_scores(token_log_probs: Iterable[Sequence[float]], texts: Sequence[str]) -> np.ndarray:
    """zlib-ratio score of each (token log-probs, text) pair."""
    token_log_probs = list(token_log_probs)
    if len(token_log_probs) != len(texts):
        raise ValueError(f"{len(token_log_probs)} token log-prob arrays but {len(texts)} texts")
    return np.array([zlib_ratio(lp, t) for lp, t in zip(token_log_probs, texts)])


def classifier_mia_aucs(member_logits, member_labels, nonmember_logits, nonmember_labels) -> dict[str, float]:
    """LOSS, confidence and entropy AUCs of a classifier, members vs non-members."""
    return {
        # -loss is the true label's log-probability
        "loss": membership_auc(true_label_log_probs(member_logits, member_labels),
                               true_label_log_probs(nonmember_logits, nonmember_labels)),
        "confidence": membership_auc(confidence_scores(member_logits), confidence_scores(nonmember_logits)),
        "entropy": membership_auc(entropy_scores(member_logits), entropy_scores(nonmember_logits)),
    }


def _mean_log_probs(rows) -> np.ndarray:
    arrays = [_array(r, "token log-probs", ndim=1) for r in rows]
    if any(a.size == 0 for a in arrays):
        raise ValueError("every text needs at least one scored token")
    return np.array([a.mean() for a in arrays])


def language_model_mia_aucs(member_log_probs, member_texts, nonmember_log_probs, nonmember_texts,
                            k: float = 0.2) -> dict[str, float]:
    """LOSS (mean token NLL), zlib-ratio and Min-K% AUCs of a language model.

    ``*_log_probs`` are lists with one array of scored-token log-probabilities per text; ``k`` is
    the Min-K% fraction (reported under the key ``"min_k"``).
    """
    member_log_probs, nonmember_log_probs = list(member_log_probs), list(nonmember_log_probs)
    return {
        # -loss = the mean token log-prob = -log perplexity
        "loss": membership_auc(_mean_log_probs(member_log_probs), _mean_log_probs(nonmember_log_probs)),
        "zlib": membership_auc(zlib_ratio_scores(member_log_probs, member_texts),
                               zlib_ratio_scores(nonmember_log_probs, nonmember_texts)),
        "min_k": membership_auc(min_k_scores(member_log_probs, k), min_k_scores(nonmember_log_probs, k)),
    }


def perplexity(token_log_probs) -> float:
    """exp(mean token NLL) of one text."""
    return math.exp(-_array(token_log_probs, "token log-probs", ndim=1).mean())
