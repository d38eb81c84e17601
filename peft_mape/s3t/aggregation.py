"""Combining the logits of the shards that still serve a model."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


def aggregate(shard_logits: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """(N, C) scores: mean logits, mean probabilities, or the fraction of shards voting per class."""
    stacked = torch.stack(list(shard_logits))
    if mode == "mean_logits":
        return stacked.mean(dim=0)
    if mode == "mean_probs":
        return stacked.softmax(dim=-1).mean(dim=0)
    if mode == "vote":
        votes = torch.nn.functional.one_hot(stacked.argmax(dim=-1), stacked.shape[-1]).to(stacked.dtype)
        return votes.mean(dim=0)
    raise ValueError(f"unknown aggregation {mode!r}")


def predictions(shard_logits: Sequence[torch.Tensor], mode: str) -> torch.Tensor:
    """Predicted classes; a vote tie goes to the class with the higher mean probability."""
    scores = aggregate(shard_logits, mode)
    if mode == "vote":
        # Vote fractions differ by at least 1/m, so adding mean probabilities scaled below 1/m
        # only reorders tied classes.
        mean_probs = aggregate(shard_logits, "mean_probs")
        scores = scores + mean_probs / (2 * len(shard_logits))
    return scores.argmax(dim=-1)


def log_mean_exp(log_probs: Iterable[torch.Tensor]) -> torch.Tensor:
    """log((1/m) Σ_s exp(x_s)), elementwise over m same-shaped tensors: the log of the mean of the
    shards' probabilities, given their log-probabilities.

    Accumulated with ``torch.logaddexp`` (a two-term logsumexp, so nothing underflows however
    small a probability) and one running tensor, not m stacked ones: a causal LM's per-position
    distributions are [batch, length, vocabulary] each. Computed in at least float32.
    """
    total, count = None, 0
    for x in log_probs:
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        total = x if total is None else torch.logaddexp(total, x)
        count += 1
    if total is None:
        raise ValueError("log_mean_exp needs at least one tensor")
    return total - math.log(count)
