"""Evaluation metrics on toy inputs whose answers can be checked by hand."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from peft_mape.evaluation import (
    classification_metrics, classifier_mia_aucs, confidence_scores, entropy_scores, language_model_metrics,
    language_model_mia_aucs, loss_mia_auc, membership_auc, metric_gaps, min_k_prob, min_k_scores, perplexity,
    prediction_entropy, token_log_probs, true_label_log_probs, zlib_ratio,
)
from peft_mape.common.data import make_loader

from conftest import tiny_examples, tiny_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_auc_is_one_for_separated_scores_and_half_for_identical():
    assert membership_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert membership_auc([0, 1], [2, 3]) == 0.0
    assert membership_auc([1, 1, 1], [1, 1]) == 0.5
    # 2 of the 4 member/non-member pairs are ordered right, one is a tie (counts 1/2): 2.5 / 4
    assert membership_auc([1, 3], [2, 1]) == pytest.approx(2.5 / 4)


def test_auc_needs_both_sides():
    with pytest.raises(ValueError, match="members and non-members"):
        membership_auc([], [1.0])


def test_loss_attack_prefers_low_loss():
    assert loss_mia_auc([0.1, 0.2], [1.0, 2.0]) == 1.0


def test_entropy_of_uniform_and_one_hot_distributions():
    uniform = np.zeros((2, 4))
    assert prediction_entropy(uniform) == pytest.approx([math.log(4)] * 2)
    peaked = np.array([[100.0, 0.0, 0.0]])
    assert prediction_entropy(peaked)[0] == pytest.approx(0.0, abs=1e-12)
    assert entropy_scores(peaked)[0] > entropy_scores(uniform)[0]


def test_confidence_is_top_probability_and_true_label_log_prob_is_minus_cross_entropy():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]))
    assert confidence_scores(logits) == pytest.approx([0.7, 0.5])
    assert true_label_log_probs(logits, [1, 2]) == pytest.approx([math.log(0.2), math.log(0.5)])
    expected = -torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor([1, 2]), reduction="none")
    assert true_label_log_probs(torch.tensor(logits), torch.tensor([1, 2])) == pytest.approx(expected.numpy())


def test_true_label_log_probs_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must lie"):
        true_label_log_probs(np.zeros((2, 3)), [0, 3])
    with pytest.raises(ValueError, match="labels must be integers"):
        true_label_log_probs(np.zeros((2, 3)), [0.5, 1.0])


def test_classifier_aucs_on_confident_members_and_uncertain_nonmembers():
    members = np.array([[5.0, 0, 0], [0, 6.0, 0]])  # confident and right
    nonmembers = np.array([[0.1, 0, 0], [0, 0, 0.2]])  # near uniform
    aucs = classifier_mia_aucs(members, [0, 1], nonmembers, [0, 2])
    assert aucs == {"loss": 1.0, "confidence": 1.0, "entropy": 1.0}
    # the same logits on both sides cannot be told apart by any attack
    assert classifier_mia_aucs(members, [0, 1], members, [0, 1]) == {"loss": 0.5, "confidence": 0.5, "entropy": 0.5}


def test_min_k_prob_averages_the_lowest_fraction():
    log_probs = [-0.1, -3.0, -0.2, -1.0, -0.5]
    assert min_k_prob(log_probs, k=0.4) == pytest.approx((-3.0 - 1.0) / 2)  # int(5 * 0.4) = 2 tokens
    assert min_k_prob(log_probs, k=1.0) == pytest.approx(np.mean(log_probs))
    assert min_k_prob(log_probs, k=0.1) == -3.0  # int(0.5) = 0 -> at least one token
    assert list(min_k_scores([[-1.0, -2.0], [-4.0]], k=0.5)) == [-2.0, -4.0]
    with pytest.raises(ValueError, match="k must be"):
        min_k_prob(log_probs, k=0.0)
    with pytest.raises(ValueError, match="at least one scored token"):
        min_k_prob([], k=0.5)


def test_zlib_ratio_of_a_known_string():
    text = "hello hello hello hello"
    compressed = len(zlib.compress(text.encode("utf-8")))
    assert zlib_ratio([-1.0, -3.0], text) == pytest.approx(-2.0 / compressed)
    assert perplexity([-1.0, -3.0]) == pytest.approx(math.exp(2.0))
    with pytest.raises(ValueError, match="non-empty text"):
        zlib_ratio([-1.0], "")


def test_language_model_aucs_separate_likely_members():
    members = [[-0.1, -0.2], [-0.05, -0.1, -0.3]]
    nonmembers = [[-2.0, -3.0], [-1.5, -4.0, -2.5]]
    texts = ["the cat sat", "on the mat today"]
    aucs = language_model_mia_aucs(members, texts, nonmembers, texts, k=0.5)
    assert aucs == {"loss": 1.0, "zlib": 1.0, "min_k": 1.0}
    with pytest.raises(ValueError, match="2 token log-prob arrays but 1 texts"):
        language_model_mia_aucs(members, texts[:1], nonmembers, texts)


def test_token_log_probs_match_the_models_loss():
    model = tiny_model("gpt2")
    examples = tiny_examples("gpt2", 4, seed=3)
    examples[0]["labels"][:2] = -100  # a masked prompt is not scored
    loader = make_loader(examples, 2)
    rows = token_log_probs(model, loader)
    assert [len(r) for r in rows] == [len(e["labels"]) - 1 - (2 - 1) if i == 0 else len(e["labels"]) - 1
                                      for i, e in enumerate(examples)]
    with torch.no_grad():
        for row, ex in zip(rows, examples):
            batch = {k: v[None] for k, v in ex.items()}
            assert -row.mean() == pytest.approx(float(model(**batch).loss), rel=1e-5)


def test_classification_metrics_on_a_tiny_classifier():
    model = tiny_model("bert")
    forget, test = tiny_examples("bert", 6, seed=1), tiny_examples("bert", 8, seed=2)
    metrics = classification_metrics(model, make_loader(forget, 4), make_loader(test, 4), make_loader(test, 4))
    assert set(metrics) == {"forget_acc", "forget_loss", "test_acc", "test_loss", "retain_acc", "retain_loss",
                            "mia_loss", "mia_confidence", "mia_entropy"}
    assert metrics["test_acc"] == metrics["retain_acc"] and 0.0 <= metrics["forget_acc"] <= 1.0
    # the same data on both sides of the attack: chance level
    same = classification_metrics(model, make_loader(test, 4), make_loader(test, 4))
    assert same["mia_loss"] == same["mia_confidence"] == same["mia_entropy"] == 0.5
    assert metric_gaps({"a": 1.0, "b": 2.0}, {"a": 0.25}) == {"a": 0.75}


def test_language_model_metrics_on_a_tiny_lm():
    model = tiny_model("gpt2")
    forget, test = tiny_examples("gpt2", 3, seed=1), tiny_examples("gpt2", 3, seed=2)
    texts = ["one text", "another text", "a third text"]
    metrics = language_model_metrics(model, make_loader(forget, 2), make_loader(test, 2), texts, texts)
    assert metrics["forget_perplexity"] == pytest.approx(math.exp(metrics["forget_loss"]))
    assert {"mia_loss", "mia_zlib", "mia_min_k"} <= set(metrics)
