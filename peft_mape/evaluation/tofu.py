"""TOFU-style metrics for unlearning in language models (Maini et al. 2024; SPEC §8).

Every metric is a plain function of per-example numbers, usable on its own; the model-facing
helpers (:func:`evaluate_split`, :func:`tofu_summary`) only gather those numbers. Notation:
``lp`` = the mean log-probability of an answer's tokens given its question, so exp(lp) =
P(a|q)^(1/|a|), TOFU's length-normalised probability (exp(-mean token NLL)).

- **Answer probability**, forget/retain splits: mean over examples of exp(lp).
  real_authors/world_facts: mean of the normalised P(correct) / (P(correct) + Σ P(perturbed)),
  each P length-normalised.
- **ROUGE-L recall** of the greedy generation against the reference answer (``rouge-score``,
  stemming on, as TOFU).
- **Truth ratio** R = mean_k P(perturbed_k)^(1/|a_k|) / P(correct)^(1/|a|) per example (the
  paper's arithmetic mean; TOFU's code averages the perturbed *losses*, i.e. a geometric mean:
  ``perturbed_mean="geometric"``). TOFU has paraphrased answers in the denominator; this data
  has none, so the correct answer stands in (as TOFU itself does for real authors and world
  facts). Aggregated as TOFU does: retain/real_authors/world_facts mean(max(0, 1 - R)) (high =
  prefers the truth), forget mean(min(R, 1/R)) (high = cannot tell truth from perturbation).
- **Forget quality**: the KS-test p-value (``scipy.stats.ks_2samp``) between the per-example
  forget truth ratios of the unlearned model and of the retrained model (high = same
  distribution as the gold standard).
- **Model utility**: the harmonic mean of the nine retain, real_authors and world_facts numbers
  (answer probability, ROUGE-L recall, truth-ratio score of each).

The forget and retain sets carry no perturbed answers: :func:`swapped_answers` builds them
deterministically from the answers of neighbouring questions of the same set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from ..common.causal_lm import answer_log_probs, format_answer, format_prompt, greedy_generate, truncate_answer

KINDS = ("forget", "retain", "facts")
PERTURBED_MEANS = ("arithmetic", "geometric")
UTILITY_SPLITS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("probability", "rouge_l", "truth_ratio")


def _array(values, what: str, ndim: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{what} must be a {ndim}-D array, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{what} is empty")
    if np.isnan(array).any():
        raise ValueError(f"{what} contains NaN")
    return array


def swapped_answers(answers: Sequence[str], num_perturbed: int = 3) -> list[list[str]]:
    """Perturbed answers for sets that have none: the answers of neighbouring questions of the set.

    Example i gets the answers of examples (i + k) mod n for k = 1..num_perturbed: deterministic
    and never its own answer. TOFU lists an author's questions in a row, so the neighbours are
    mostly about the same author: the swapped answer names the right author but states another
    of their facts — the closest this data allows to TOFU's perturbed answers (the correct answer
    with its facts altered). Answers about other authors would be rejected by name alone, even
    by a model that never saw either.
    """
    n = len(answers)
    if num_perturbed < 1:
        raise ValueError(f"num_perturbed must be >= 1, got {num_perturbed}")
    if n < num_perturbed + 1:
        raise ValueError(f"need more than {num_perturbed} answers to swap in {num_perturbed} others, got {n}")
    return [[answers[(i + k) % n] for k in range(1, num_perturbed + 1)] for i in range(n)]


def answer_probability(correct_mean_log_probs) -> np.ndarray:
    """Per-example length-normalised probability P(a|q)^(1/|a|) = exp(mean token log-prob)."""
    return np.exp(_array(correct_mean_log_probs, "correct_mean_log_probs", 1))


def normalised_answer_probability(correct_mean_log_probs, perturbed_mean_log_probs) -> np.ndarray:
    """Per-example P(correct) / (P(correct) + Σ_k P(perturbed_k)), each length-normalised (TOFU's
    probability on real_authors and world_facts, where the options are multiple-choice answers)."""
    correct = _array(correct_mean_log_probs, "correct_mean_log_probs", 1)
    perturbed = _array(perturbed_mean_log_probs, "perturbed_mean_log_probs", 2)
    _check_rows(correct, perturbed)
    options = np.concatenate([correct[:, None], perturbed], axis=1)
    # exp-normalise in log space: stable for very unlikely answers.
    return np.exp(correct - np.logaddexp.reduce(options, axis=1))


def _check_rows(correct: np.ndarray, perturbed: np.ndarray) -> None:
    if perturbed.shape[0] != correct.shape[0]:
        raise ValueError(f"{correct.shape[0]} correct answers but {perturbed.shape[0]} rows of perturbed answers")


def truth_ratio(correct_mean_log_probs, perturbed_mean_log_probs, perturbed_mean: str = "arithmetic") -> np.ndarray:
    """Per-example R = mean_k P(perturbed_k)^(1/|a_k|) / P(correct)^(1/|a|).

    ``perturbed_mean="arithmetic"`` averages the normalised probabilities (the paper);
    ``"geometric"`` averages their logs, i.e. the mean token losses (TOFU's code). R < 1: the
    model prefers the correct answer.
    """
    if perturbed_mean not in PERTURBED_MEANS:
        raise ValueError(f"perturbed_mean must be one of {list(PERTURBED_MEANS)}, got {perturbed_mean!r}")
    correct = _array(correct_mean_log_probs, "correct_mean_log_probs", 1)
    perturbed = _array(perturbed_mean_log_probs, "perturbed_mean_log_probs", 2)
    _check_rows(correct, perturbed)
    if perturbed_mean == "arithmetic":
        log_mean = np.logaddexp.reduce(perturbed, axis=1) - np.log(perturbed.shape[1])
    else:
        log_mean = perturbed.mean(axis=1)
    return np.exp(log_mean - correct)


def truth_ratio_score(ratios, kind: str) -> float:
    """TOFU's aggregate of per-example truth ratios R.

    ``kind="forget"``: mean(min(R, 1/R)) — 1 when truth and perturbations are equally likely.
    ``"retain"``/``"facts"``: mean(max(0, 1 - R)) — 1 when perturbations are far less likely.
    """
    ratios = _array(ratios, "ratios", 1)
    if (ratios <= 0).any():
        raise ValueError("truth ratios must be positive")
    _check_kind(kind)
    if kind == "forget":
        return float(np.mean(np.minimum(ratios, 1.0 / ratios)))
    return float(np.mean(np.maximum(0.0, 1.0 - ratios)))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-example ROUGE-L recall of ``predictions`` against ``references`` (rouge-score, stemmed):
    the share of the reference's words found, in order, in the prediction."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)],
                    dtype=np.float64)


def forget_quality(unlearned_forget_ratios, retrained_forget_ratios) -> float:
    """KS-test p-value between the forget truth ratios of the unlearned and the retrained model.

    1.0 for identical samples; small values mean the two distributions differ (the unlearned
    model still tells the forget set's truth apart differently from a model that never saw it).
    """
    a = _array(unlearned_forget_ratios, "unlearned_forget_ratios", 1)
    b = _array(retrained_forget_ratios, "retrained_forget_ratios", 1)
    return float(stats.ks_2samp(a, b).pvalue)


def model_utility(metrics) -> float:
    """Harmonic mean of utility numbers in [0, 1] (TOFU: the nine of :func:`utility_metrics`).

    Accepts a mapping (its values are used) or a sequence. Any zero gives 0.
    """
    values = np.asarray(list(metrics.values()) if isinstance(metrics, Mapping) else list(metrics), dtype=np.float64)
    if values.size == 0:
        raise ValueError("model utility needs at least one metric")
    if np.isnan(values).any() or (values < 0).any():
        raise ValueError(f"utility metrics must be non-negative numbers, got {values.tolist()}")
    if (values == 0).any():
        return 0.0
    return float(stats.hmean(values))


# --------------------------------------------------------------------------- on a model


@dataclass
class SplitResult:
    """TOFU numbers of one model on one split, with the per-example values behind them
    (``rouge``/``generations`` cover the questions ROUGE-L was computed on)."""

    name: str
    kind: str
    probability: float
    rouge_l: float
    truth_ratio: float
    probabilities: np.ndarray
    rouge: np.ndarray
    ratios: np.ndarray
    generations: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {"probability": self.probability, "rouge_l": self.rouge_l, "truth_ratio": self.truth_ratio}

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, **self.summary(), "num_examples": int(self.ratios.size),
                "per_example": {"probability": self.probabilities.tolist(), "rouge_l": self.rouge.tolist(),
                                "truth_ratio": self.ratios.tolist()},
                "generations": list(self.generations)}


def _rouge_choice(n: int, rouge_indices: Optional[Sequence[int]]) -> list[int]:
    chosen = list(range(n)) if rouge_indices is None else list(rouge_indices)
    if not chosen or any(not 0 <= i < n for i in chosen):
        raise ValueError(f"rouge_indices must be a non-empty list of question indices in [0, {n})")
    return chosen


@dataclass
class ScoringOptions:
    """How a split is scored and generated: the prompt ``template``, encoding limits
    (``max_length``, ``max_answer_tokens``), generation length, batch size, the number of
    perturbed answers built when none are given, and the mean over perturbed answers."""

    template: str = "plain"
    max_length: Optional[int] = None
    max_answer_tokens: Optional[int] = None
    max_new_tokens: int = 32
    batch_size: int = 16
    num_perturbed: int = 3
    perturbed_mean: str = "arithmetic"
    progress: bool = False


def evaluate_split(model, tokenizer, questions: Sequence[str], answers: Sequence[str],
                   perturbed: Optional[Sequence[Sequence[str]]] = None, *, kind: str, name: Optional[str] = None,
                   rouge_indices: Optional[Sequence[int]] = None, generations: Optional[Sequence[str]] = None,
                   **options) -> SplitResult:
    """Answer probability, ROUGE-L recall and truth ratio of ``model`` on one split.

    ``kind``: "forget" or "retain" (probability exp(lp); truth-ratio score min(R, 1/R) for
    forget, max(0, 1 - R) for retain) or "facts" (real_authors/world_facts: normalised
    probability, max(0, 1 - R)). ``perturbed`` defaults to :func:`swapped_answers`.
    Answers are cut to ``max_answer_tokens`` when scored, and the generation (at most
    ``max_new_tokens``) is compared with the same cut reference. Generation costs several times
    more than scoring: ``rouge_indices`` limits ROUGE-L to those questions (default: all), while
    probabilities and truth ratios always cover every question. ``generations``: the greedy
    answers to the ``rouge_indices`` questions when the caller has generated them already (see
    :func:`evaluate_splits`, which generates for several splits in one batched call).
    ``options`` are :class:`ScoringOptions` fields.
    """
    o = ScoringOptions(**options)
    template, max_length, max_answer_tokens, batch_size = o.template, o.max_length, o.max_answer_tokens, o.batch_size
    max_new_tokens, num_perturbed, perturbed_mean, progress = o.max_new_tokens, o.num_perturbed, o.perturbed_mean, \
        o.progress
    _check_kind(kind)
    if len(questions) != len(answers):
        raise ValueError(f"got {len(questions)} questions but {len(answers)} answers")
    perturbed = swapped_answers(answers, num_perturbed) if perturbed is None else [list(p) for p in perturbed]
    if len(perturbed) != len(answers) or len({len(p) for p in perturbed}) != 1 or not perturbed[0]:
        raise ValueError("perturbed must hold the same number (>= 1) of perturbed answers for every question")
    k = len(perturbed[0])
    prompts = [format_prompt(q, tokenizer, template) for q in questions]
    # One scoring pass over every (prompt, answer) pair: the correct answers, then the perturbed.
    pair_prompts = prompts + [p for p, alts in zip(prompts, perturbed) for _ in alts]
    pair_answers = [format_answer(a, template) for a in answers] + [format_answer(x, template) for alts in perturbed
                                                                     for x in alts]
    scores = answer_log_probs(model, tokenizer, pair_prompts, pair_answers, batch_size=batch_size,
                              max_length=max_length, max_answer_tokens=max_answer_tokens, progress=progress,
                              desc=f"score {name or kind}")
    n = len(answers)
    correct, wrong = scores.mean[:n], scores.mean[n:].reshape(n, k)
    if kind == "facts":
        probabilities = normalised_answer_probability(correct, wrong)
    else:
        probabilities = answer_probability(correct)
    ratios = truth_ratio(correct, wrong, perturbed_mean)
    chosen = _rouge_choice(n, rouge_indices)
    if generations is None:
        generations = greedy_generate(model, tokenizer, [prompts[i] for i in chosen], max_new_tokens=max_new_tokens,
                                      batch_size=batch_size, progress=progress, desc=f"generate {name or kind}")
    elif len(generations) != len(chosen):
        raise ValueError(f"got {len(generations)} generations for {len(chosen)} ROUGE questions")
    references = [truncate_answer(tokenizer, answers[i], max_answer_tokens) for i in chosen]
    rouge = rouge_l_recall(generations, references)
    return SplitResult(name=name or kind, kind=kind, probability=float(probabilities.mean()),
                       rouge_l=float(rouge.mean()), truth_ratio=truth_ratio_score(ratios, kind),
                       probabilities=probabilities, rouge=rouge, ratios=ratios, generations=generations)


def evaluate_splits(model, tokenizer, splits: Mapping[str, Mapping], *, template: str = "plain",
                    generation_batch_size: int = 128, progress: bool = False, **common) -> dict[str, SplitResult]:
    """:func:`evaluate_split` for several splits, with their greedy answers generated together.

    ``splits`` maps a name to that split's arguments (``questions``, ``answers`` and optionally
    ``perturbed``, ``kind``, ``rouge_indices``, ``max_new_tokens``); ``common`` holds the
    arguments every split shares (``max_length``, ``batch_size``, ...). The ROUGE prompts of
    every split with the same ``max_new_tokens`` share one :func:`greedy_generate` call in
    batches of ``generation_batch_size`` (same generations as one call per split, tested): fewer,
    larger generation steps, which pay off where a step's cost does not grow with the batch
    (accelerators; on CPU they cost about the same).
    """
    plans = {name: _rouge_choice(len(spec["questions"]), spec.get("rouge_indices")) for name, spec in splits.items()}
    prompts_by_length: dict[int, list[tuple[str, str]]] = {}
    for name, spec in splits.items():
        new_tokens = spec.get("max_new_tokens", common.get("max_new_tokens", 32))
        prompts_by_length.setdefault(new_tokens, []).extend(
            (name, format_prompt(spec["questions"][i], tokenizer, template)) for i in plans[name])
    generated: dict[str, list[str]] = {name: [] for name in splits}
    for new_tokens, pairs in prompts_by_length.items():
        texts = greedy_generate(model, tokenizer, [p for _, p in pairs], max_new_tokens=new_tokens,
                                batch_size=generation_batch_size, progress=progress, desc="generate")
        for (name, _), text in zip(pairs, texts):
            generated[name].append(text)
    shared = {k: v for k, v in common.items() if k != "max_new_tokens"}
    return {name: evaluate_split(model, tokenizer, spec["questions"], spec["answers"], spec.get("perturbed"),
                                 kind=spec.get("kind", "retain"), name=name, template=template,
                                 rouge_indices=plans[name], generations=generated[name], progress=progress,
                                 **shared)
            for name, spec in splits.items()}


def utility_metrics(retain: SplitResult, real_authors: SplitResult, world_facts: SplitResult) -> dict[str, float]:
    """The nine numbers behind model utility, named ``<split> <metric>``."""
    return {f"{split} {metric}": getattr(result, metric)
            for split, result in zip(UTILITY_SPLITS, (retain, real_authors, world_facts))
            for metric in UTILITY_METRICS}


def tofu_summary(forget: SplitResult, retain: SplitResult, real_authors: SplitResult, world_facts: SplitResult,
                 retrained_forget_ratios=None) -> dict[str, float]:
    """All headline numbers of one model: forget and utility metrics, model utility and, given
    the retrained model's forget truth ratios (same questions), forget quality."""
    if forget.kind != "forget":
        raise ValueError(f"the first split must be a forget split, got kind {forget.kind!r}")
    utility = utility_metrics(retain, real_authors, world_facts)
    out = {f"forget {metric}": getattr(forget, metric) for metric in UTILITY_METRICS}
    out.update(utility)
    out["model utility"] = model_utility(utility)
    if retrained_forget_ratios is not None:
        out["forget quality"] = forget_quality(forget.ratios, retrained_forget_ratios)
    return out
