"""Slice orders: which sequence of slices each of a shard's B models is trained on.

An order is a tuple of slice indices; position i (0-based) of the order is trained into layer
block i. Deleting an example of slice k truncates every order at the position of k, so the
first slice of an order is its single point of total failure. Both strategies therefore give
the first min(B, L) orders distinct slices at every position (a Latin rectangle), which is what
the deletion capacity mL·H_{mB'} relies on.
"""

from __future__ import annotations

import itertools
from typing import Iterator, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from .config import BMS_EXHAUSTIVE_MAX_SLICES, S3TConfig

Order = tuple


def sequence_score(order: Sequence[int], prior: Sequence[float], expected_deletions: int) -> float:
    """SPEC §6 score Σ_i i·(1 − Σ_{j≤i} p_{π_j})^t: depth-weighted odds that each prefix survives t
    deletions drawn from ``prior``."""
    p = np.asarray(prior, dtype=float)
    cumulative = np.clip(1.0 - np.cumsum(p[list(order)]), 0.0, None)
    depths = np.arange(1, len(order) + 1)
    return float(np.sum(depths * cumulative**expected_deletions))


def cyclic_orders(num_slices: int, budget: int) -> list[Order]:
    """Evenly spaced rotations of (0, …, L−1); beyond L, rotations of further rotation classes.

    With B <= L every slice sits at each position at most once, so every slice is equally likely
    to truncate an order at any depth (uniform deletion odds).
    """
    orders: list[Order] = []
    for base in _rotation_classes(num_slices):
        wanted = min(num_slices, budget - len(orders))
        for offset in _evenly_spaced(num_slices, wanted):
            orders.append(tuple(base[(offset + i) % num_slices] for i in range(num_slices)))
        if len(orders) == budget:
            return orders
    raise ValueError(f"budget B={budget} exceeds the number of orders of L={num_slices} slices")


def bms_orders(num_slices: int, budget: int, prior: Sequence[float], expected_deletions: int) -> list[Order]:
    """Bipartite-matching selection: each order is a slice→position assignment solved with
    ``scipy.optimize.linear_sum_assignment``.

    The score is not separable over (slice, position) pairs, so it is linearised: placing slice
    s at position k costs p_s·w_k with w_k = Σ_{i≥k} i·t·(1 − P_i)^{t−1}, the score's sensitivity
    to deletion mass in prefix k, evaluated at the cumulative odds P of the current order; the
    assignment is re-solved at the new P until it stops changing, keeping the best exact score.
    Pairs used by earlier orders of the same group of L are forbidden, so the first min(B, L)
    orders form a Latin rectangle. Orders beyond L rank all unused permutations by exact score.
    """
    prior = np.asarray(prior, dtype=float)
    orders: list[Order] = []
    used = np.zeros((num_slices, num_slices), dtype=bool)
    for _ in range(min(budget, num_slices)):
        order = _best_matching(prior, expected_deletions, used)
        used[list(order), np.arange(num_slices)] = True
        orders.append(order)
    if budget > num_slices:
        if num_slices > BMS_EXHAUSTIVE_MAX_SLICES:
            raise ValueError(f"bms budgets above L need L <= {BMS_EXHAUSTIVE_MAX_SLICES}")
        chosen = set(orders)
        ranked = sorted(
            (perm for perm in itertools.permutations(range(num_slices)) if perm not in chosen),
            key=lambda perm: (-sequence_score(perm, prior, expected_deletions), perm),
        )
        orders.extend(ranked[: budget - num_slices])
    return orders


def select_orders(config: S3TConfig) -> list[list[Order]]:
    """The B orders of every shard (one list per shard)."""
    if config.strategy == "cyclic":
        orders = cyclic_orders(config.num_slices, config.budget)
        return [list(orders) for _ in range(config.num_shards)]
    cache: dict[tuple, list[Order]] = {}
    per_shard = []
    for shard in range(config.num_shards):
        prior = config.prior_for_shard(shard)
        if prior not in cache:
            cache[prior] = bms_orders(config.num_slices, config.budget, prior, config.expected_deletions)
        per_shard.append(list(cache[prior]))
    return per_shard


def _best_matching(prior: np.ndarray, expected_deletions: int, forbidden: np.ndarray) -> Order:
    num_slices = len(prior)
    depths = np.arange(1, num_slices + 1, dtype=float)
    # Forbidden pairs get a cost above any feasible assignment; a perfect matching avoiding them
    # always exists because the allowed graph is (L − b)-regular bipartite after b orders.
    penalty = 1.0 + float(np.sum(prior)) * float(np.sum(depths)) * expected_deletions * num_slices
    cumulative = np.zeros(num_slices)
    best: Order | None = None
    best_score = -np.inf
    seen: set[Order] = set()
    for _ in range(4 * num_slices):
        sensitivity = depths * expected_deletions * np.clip(1.0 - cumulative, 0.0, None) ** (expected_deletions - 1)
        position_weight = np.cumsum(sensitivity[::-1])[::-1]
        cost = np.outer(prior, position_weight) + penalty * forbidden
        slices, positions = linear_sum_assignment(cost)
        order = tuple(int(s) for _, s in sorted(zip(positions, slices)))
        if forbidden[list(order), np.arange(num_slices)].any():
            raise RuntimeError("bipartite matching used a forbidden slice/position pair")
        score = sequence_score(order, prior, expected_deletions)
        if score > best_score:
            best, best_score = order, score
        if order in seen:
            break
        seen.add(order)
        cumulative = np.cumsum(prior[list(order)])
    assert best is not None
    return best


def _rotation_classes(num_slices: int) -> Iterator[Order]:
    """Permutations starting with slice 0, one per class of cyclic rotations, identity first."""
    for tail in itertools.permutations(range(1, num_slices)):
        yield (0,) + tail


def _evenly_spaced(total: int, count: int) -> list[int]:
    return [i * total // count for i in range(count)]
