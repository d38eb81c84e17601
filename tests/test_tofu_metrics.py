"""peft_mape.evaluation.tofu: TOFU metrics on hand-checkable numbers and on a tiny Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from peft_mape.common.causal_lm import answer_log_probs, format_answer, format_prompt
from peft_mape.evaluation.tofu import (
    answer_probability, evaluate_split, evaluate_splits, forget_quality, model_utility, normalised_answer_probability,
    rouge_l_recall, swapped_answers, tofu_summary, truth_ratio, truth_ratio_score, utility_metrics,
)

from conftest import tiny_model
from toy_lm import toy_tokenizer

log = math.log


def test_answer_probability_is_the_length_normalised_probability():
    # a 2-token answer with P = 0.25 has mean log-prob log(0.25)/2, i.e. P^(1/2) = 0.5
    assert answer_probability([log(0.25) / 2]) == pytest.approx([0.5])


def test_normalised_probability_divides_by_all_options():
    correct = [log(0.5), log(0.1)]
    perturbed = [[log(0.25), log(0.25)], [log(0.3), log(0.6)]]
    assert normalised_answer_probability(correct, perturbed) == pytest.approx([0.5, 0.1])


def test_truth_ratio_arithmetic_and_geometric():
    correct, perturbed = [log(0.5)], [[log(0.25), log(0.125)]]
    assert truth_ratio(correct, perturbed) == pytest.approx([(0.25 + 0.125) / 2 / 0.5])
    assert truth_ratio(correct, perturbed, "geometric") == pytest.approx([math.sqrt(0.25 * 0.125) / 0.5])
    with pytest.raises(ValueError, match="perturbed_mean"):
        truth_ratio(correct, perturbed, "median")
    with pytest.raises(ValueError, match="1 correct answers but 2 rows"):
        truth_ratio(correct, perturbed * 2)


def test_truth_ratio_scores_follow_tofus_conventions():
    ratios = [0.5, 2.0, 0.25]
    assert truth_ratio_score(ratios, "forget") == pytest.approx((0.5 + 0.5 + 0.25) / 3)  # min(R, 1/R)
    assert truth_ratio_score(ratios, "retain") == pytest.approx((0.5 + 0.0 + 0.75) / 3)  # max(0, 1 - R)
    assert truth_ratio_score(ratios, "facts") == truth_ratio_score(ratios, "retain")
    with pytest.raises(ValueError, match="kind"):
        truth_ratio_score(ratios, "test")
    with pytest.raises(ValueError, match="positive"):
        truth_ratio_score([0.0], "forget")


def test_rouge_l_recall_on_known_strings():
    refs = ["the cat sat on the mat", "Paris", "the cats sat"]
    preds = ["the cat on mat", "It is Paris.", "a cat sitting"]
    # LCS "the cat on mat" = 4 of 6 reference words; "Paris" found; stemming matches cats/cat only
    assert rouge_l_recall(preds, refs) == pytest.approx([4 / 6, 1.0, 1 / 3])
    assert rouge_l_recall([""], ["anything"]) == pytest.approx([0.0])
    with pytest.raises(ValueError, match="1 predictions but 2 references"):
        rouge_l_recall(["a"], ["a", "b"])


def test_forget_quality_is_the_ks_p_value():
    rng = np.random.default_rng(0)
    sample = rng.uniform(0.2, 1.0, 50)
    assert forget_quality(sample, sample) == pytest.approx(1.0)
    assert forget_quality(sample, sample + 5.0) < 1e-10  # disjoint supports
    assert 0.05 < forget_quality(sample, rng.uniform(0.2, 1.0, 50)) <= 1.0
    with pytest.raises(ValueError, match="empty"):
        forget_quality([], sample)


def test_model_utility_is_the_harmonic_mean():
    assert model_utility([1.0, 0.5]) == pytest.approx(2 / 3)
    assert model_utility({"a": 0.4, "b": 0.4, "c": 0.4}) == pytest.approx(0.4)
    assert model_utility([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        model_utility([])
    with pytest.raises(ValueError, match="non-negative"):
        model_utility([0.5, -0.1])


def test_swapped_answers_are_deterministic_and_never_the_own_answer():
    answers = [f"answer {i}" for i in range(10)]
    swapped = swapped_answers(answers, 3)
    assert swapped == swapped_answers(answers, 3)
    assert swapped[0] == ["answer 1", "answer 2", "answer 3"]
    assert swapped[9] == ["answer 0", "answer 1", "answer 2"]  # wraps around
    for own, alternatives in zip(answers, swapped):
        assert len(alternatives) == 3 and own not in alternatives and len(set(alternatives)) == 3
    with pytest.raises(ValueError, match="need more than 3"):
        swapped_answers(answers[:3], 3)


QUESTIONS = ["who wrote the play", "what is capital of france", "what is the sky", "who is the author",
             "what is the mat"]
ANSWERS = ["he wrote a book", "paris", "the sky is blue", "she is the author", "the cat sat on the mat"]


def test_evaluate_split_on_a_tiny_llama_agrees_with_the_parts(one_thread):
    tok, model = toy_tokenizer(), tiny_model("llama")
    result = evaluate_split(model, tok, QUESTIONS, ANSWERS, kind="forget", max_new_tokens=3, num_perturbed=2)
    prompts = [format_prompt(q) for q in QUESTIONS]
    correct = answer_log_probs(model, tok, prompts, [format_answer(a) for a in ANSWERS]).mean
    perturbed = swapped_answers(ANSWERS, 2)
    wrong = np.array([answer_log_probs(model, tok, [p] * 2, [format_answer(x) for x in alts]).mean
                      for p, alts in zip(prompts, perturbed)])
    assert result.probabilities == pytest.approx(np.exp(correct), rel=1e-5)
    assert result.ratios == pytest.approx(truth_ratio(correct, wrong), rel=1e-5)
    assert result.truth_ratio == pytest.approx(truth_ratio_score(result.ratios, "forget"))
    assert result.rouge_l == pytest.approx(rouge_l_recall(result.generations, ANSWERS).mean())
    facts = evaluate_split(model, tok, QUESTIONS, ANSWERS, perturbed, kind="facts", max_new_tokens=3)
    assert facts.probabilities == pytest.approx(normalised_answer_probability(correct, wrong), rel=1e-5)
    assert facts.truth_ratio == pytest.approx(truth_ratio_score(facts.ratios, "facts"))
    with pytest.raises(ValueError, match="same number"):
        evaluate_split(model, tok, QUESTIONS, ANSWERS, [["a"]] * 4 + [["a", "b"]], kind="retain")
    part = evaluate_split(model, tok, QUESTIONS, ANSWERS, perturbed, kind="facts", max_new_tokens=3,
                          rouge_indices=[3, 1])
    assert part.generations == [facts.generations[3], facts.generations[1]]
    assert part.ratios == pytest.approx(facts.ratios) and part.rouge.size == 2
    with pytest.raises(ValueError, match="rouge_indices"):
        evaluate_split(model, tok, QUESTIONS, ANSWERS, perturbed, kind="facts", rouge_indices=[5])


def test_evaluate_splits_generates_together_and_equals_one_split_at_a_time(one_thread):
    """Several splits, one batched generation per max_new_tokens: the same numbers and answers
    as evaluate_split on each split alone; bad generations/indices are refused."""
    model, tok = tiny_model("llama", seed=2), toy_tokenizer()
    perturbed = [[a] for a in ANSWERS[1:] + ANSWERS[:1]]
    specs = {"forget": {"questions": QUESTIONS, "answers": ANSWERS, "kind": "forget", "rouge_indices": [0, 3],
                        "max_new_tokens": 3},
             "facts": {"questions": QUESTIONS[:3], "answers": ANSWERS[:3], "perturbed": perturbed[:3],
                       "kind": "facts", "max_new_tokens": 3},
             "retain": {"questions": QUESTIONS[1:], "answers": ANSWERS[1:], "kind": "retain", "max_new_tokens": 2}}
    together = evaluate_splits(model, tok, specs, num_perturbed=2, generation_batch_size=16)
    assert list(together) == ["forget", "facts", "retain"]
    for name, spec in specs.items():
        alone = evaluate_split(model, tok, spec["questions"], spec["answers"], spec.get("perturbed"), kind=spec["kind"],
                               name=name, rouge_indices=spec.get("rouge_indices"),
                               max_new_tokens=spec["max_new_tokens"], num_perturbed=2)
        assert together[name].generations == alone.generations
        assert together[name].probabilities == pytest.approx(alone.probabilities, abs=1e-6)
        assert together[name].ratios == pytest.approx(alone.ratios, abs=1e-6)
        assert together[name].rouge_l == pytest.approx(alone.rouge_l)
    with pytest.raises(ValueError, match="generations"):
        evaluate_split(model, tok, QUESTIONS, ANSWERS, kind="retain", rouge_indices=[0, 1], generations=["x"])
    with pytest.raises(ValueError, match="rouge_indices"):
        evaluate_splits(model, tok, {"bad": {"questions": QUESTIONS, "answers": ANSWERS, "rouge_indices": [9]}})


def test_tofu_summary_names_the_nine_utility_numbers(one_thread):
    tok, model = toy_tokenizer(), tiny_model("llama")
    forget = evaluate_split(model, tok, QUESTIONS, ANSWERS, kind="forget", max_new_tokens=2, num_perturbed=2)
    retain = evaluate_split(model, tok, QUESTIONS, ANSWERS, kind="retain", max_new_tokens=2, num_perturbed=2)
    nine = utility_metrics(retain, retain, retain)
    assert len(nine) == 9 and "world_facts truth_ratio" in nine
    summary = tofu_summary(forget, retain, retain, retain, retrained_forget_ratios=forget.ratios)
    assert summary["forget quality"] == pytest.approx(1.0)
    assert summary["model utility"] == pytest.approx(model_utility(nine))
    with pytest.raises(ValueError, match="forget split"):
        tofu_summary(retain, retain, retain, retain)


DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu_mini"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.exists(), reason=f"TOFU-mini data not found at {DATA} (../shared/data/tofu_mini)")
def test_tofu_metrics_on_smollm2_and_real_tofu_questions(one_thread):
    """SmolLM2-135M-Instruct knows famous authors better than chance (1 in 4 options) and does not
    know TOFU's fictitious ones. Measured here: real_authors[:12] normalised probability 0.42,
    truth-ratio score 0.47, ROUGE-L 0.36; forget01[:8] ROUGE-L 0.11."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mape_devkit import assets

    path = assets.smollm_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()

    def rows(name, n):
        return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()[:n]]

    authors = rows("real_authors", 12)
    facts = evaluate_split(model, tok, [r["question"] for r in authors], [r["answer"] for r in authors],
                           [r["perturbed_answer"] for r in authors], kind="facts", max_new_tokens=12)
    assert facts.probability > 0.3, facts.probabilities  # chance: 0.25
    assert facts.truth_ratio > 0.3, facts.ratios
    assert "Shakespeare" in facts.generations[0]
    forget = rows("forget01", 8)
    result = evaluate_split(model, tok, [r["question"] for r in forget], [r["answer"] for r in forget], kind="forget",
                            max_answer_tokens=16, max_new_tokens=16)
    assert result.rouge_l < 0.3, result.generations  # unseen fictitious facts are not reproduced (0.11)
