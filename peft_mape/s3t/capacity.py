"""Deletion capacity: expected number of deletion requests until every shard has failed.

Each request hits one (shard, slice). An order is truncated at the hit slice's position, so it
only reaches depth 0 when its *first* slice is hit, and a shard fails once the first slices of
all its orders have been hit. With uniform requests and B' = min(B, L) distinct first slices
per shard this is a coupon collector over mB' coupons, each drawn with probability 1/(mL):
E[requests] = Σ_{c=1}^{mB'} mL/c = mL·H_{mB'} (SISA, one model per shard: mL·H_m).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from peft import LoraConfig

from .config import S3TConfig
from .sequences import select_orders


def harmonic(n: int) -> float:
    return float(np.sum(1.0 / np.arange(1, n + 1)))


def deletion_capacity(
    num_shards: int,
    num_slices: int,
    budget: int = 1,
    *,
    method: str = "closed_form",
    strategy: str = "cyclic",
    deletion_prior=None,
    trials: int = 2000,
    seed: int = 0,
) -> float:
    """Expected deletions before all shards fail.

    ``method="closed_form"`` returns mL·H_{mB'} (uniform deletion odds); ``"monte_carlo"`` trains
    nothing but simulates requests against the orders that ``strategy`` actually selects, drawing
    slices from ``deletion_prior`` when given.
    """
    for name, value in (("num_shards", num_shards), ("num_slices", num_slices), ("budget", budget),
                        ("trials", trials)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if method not in ("closed_form", "monte_carlo"):
        raise ValueError(f"method must be 'closed_form' or 'monte_carlo', got {method!r}")
    # The config validates budget <= L!, the strategy and the prior exactly as training would.
    config = S3TConfig(lora=LoraConfig(), num_shards=num_shards, num_slices=num_slices, budget=budget,
                       strategy=strategy, deletion_prior=deletion_prior)
    if method == "closed_form":
        if deletion_prior is not None:
            raise ValueError("the closed form assumes uniform deletion odds; use method='monte_carlo'")
        return num_shards * num_slices * harmonic(num_shards * min(budget, num_slices))
    weights = [config.prior_for_shard(s) for s in range(num_shards)]
    return simulate_deletion_capacity(select_orders(config), num_slices, slice_weights=weights,
                                      trials=trials, seed=seed)


def simulate_deletion_capacity(
    orders_per_shard: Sequence[Sequence[Sequence[int]]],
    num_slices: int,
    *,
    slice_weights: Optional[Sequence[Sequence[float]]] = None,
    trials: int = 2000,
    seed: int = 0,
) -> float:
    """Monte Carlo mean of the number of requests until every shard's orders are all at depth 0.

    Requests pick a shard uniformly and a slice from ``slice_weights[shard]`` (uniform if None).
    """
    num_shards = len(orders_per_shard)
    if slice_weights is None:
        slice_weights = [[1.0 / num_slices] * num_slices for _ in range(num_shards)]
    # Probability of each flat (shard, slice) cell being hit by one request.
    cell_probability = np.concatenate([np.asarray(w, dtype=float) / num_shards for w in slice_weights])
    first_slices = [{int(order[0]) for order in orders} for orders in orders_per_shard]
    rng = np.random.default_rng(seed)
    totals = np.empty(trials)
    for trial in range(trials):
        remaining = [set(first) for first in first_slices]
        alive = sum(1 for r in remaining if r)
        requests = 0
        while alive:
            for cell in rng.choice(len(cell_probability), size=256, p=cell_probability):
                requests += 1
                shard, slice_ = divmod(int(cell), num_slices)
                if slice_ in remaining[shard]:
                    remaining[shard].discard(slice_)
                    if not remaining[shard]:
                        alive -= 1
                        if not alive:
                            break
        totals[trial] = requests
    return float(totals.mean())
