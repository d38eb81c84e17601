"""Combining the logits of the shards that still serve a model."""

from __future__ import annotations

from typing import Sequence

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
