import itertools

import numpy as np
import pytest
from peft import LoraConfig

from peft_mape.s3t import S3TConfig, bms_orders, cyclic_orders, select_orders, sequence_score


def _is_permutation(order, num_slices):
    return sorted(order) == list(range(num_slices))


def _latin(orders):
    """No slice occupies the same position in two orders."""
    return all(len({order[pos] for order in orders}) == len(orders) for pos in range(len(orders[0])))


def test_sequence_score_matches_hand_computation():
    # order (1, 0): prefixes keep 1 - 0.2 = 0.8 and 0 of the deletion odds.
    assert sequence_score((1, 0), [0.8, 0.2], 2) == pytest.approx(1 * 0.8**2 + 2 * 0.0)
    assert sequence_score((0, 1), [0.8, 0.2], 2) == pytest.approx(1 * 0.2**2)


@pytest.mark.parametrize("num_slices,budget", [(3, 1), (3, 3), (4, 2), (4, 3), (5, 5), (6, 4)])
def test_cyclic_orders_are_distinct_latin_rotations(num_slices, budget):
    orders = cyclic_orders(num_slices, budget)
    assert len(orders) == budget == len(set(orders))
    assert all(_is_permutation(o, num_slices) for o in orders)
    assert _latin(orders)
    for order in orders:  # each is a rotation of the identity
        start = order[0]
        assert order == tuple((start + i) % num_slices for i in range(num_slices))


def test_cyclic_full_budget_gives_uniform_position_odds():
    orders = cyclic_orders(4, 4)
    for slice_ in range(4):
        assert sorted(order.index(slice_) for order in orders) == [0, 1, 2, 3]


def test_cyclic_budget_beyond_slices_uses_further_rotation_classes():
    orders = cyclic_orders(3, 6)
    assert sorted(orders) == sorted(itertools.permutations(range(3)))
    assert _latin(orders[:3]) and _latin(orders[3:])


def test_budget_larger_than_l_factorial_is_rejected():
    with pytest.raises(ValueError, match="L!"):
        S3TConfig(lora=LoraConfig(), num_slices=3, budget=7)
    with pytest.raises(ValueError, match="exceeds"):
        cyclic_orders(3, 7)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("expected_deletions", [1, 3])
def test_bms_single_order_is_the_brute_force_optimum(seed, expected_deletions):
    prior = np.random.default_rng(seed).dirichlet(np.ones(5))
    (order,) = bms_orders(5, 1, prior, expected_deletions)
    best = max(sequence_score(p, prior, expected_deletions) for p in itertools.permutations(range(5)))
    assert sequence_score(order, prior, expected_deletions) == pytest.approx(best)
    # The least deletion-prone slices come first.
    assert list(order) == list(np.argsort(prior, kind="stable"))


def test_bms_orders_form_a_latin_rectangle_under_a_skewed_prior():
    prior = [0.55, 0.25, 0.1, 0.06, 0.04]
    orders = bms_orders(5, 5, prior, 3)
    assert len(set(orders)) == 5 and all(_is_permutation(o, 5) for o in orders)
    assert _latin(orders)
    assert orders[0] == (4, 3, 2, 1, 0)
    # Matching beats the identity rotations on the score it optimises.
    total = sum(sequence_score(o, prior, 3) for o in orders[:2])
    assert total > sum(sequence_score(o, prior, 3) for o in cyclic_orders(5, 2))


def test_bms_beyond_l_ranks_remaining_permutations_by_score():
    prior = [0.5, 0.3, 0.2]
    orders = bms_orders(3, 5, prior, 2)
    assert len(set(orders)) == 5
    extra = [sequence_score(o, prior, 2) for o in orders[3:]]
    assert extra == sorted(extra, reverse=True)
    leftover = set(itertools.permutations(range(3))) - set(orders)
    assert all(sequence_score(o, prior, 2) <= min(extra) + 1e-12 for o in leftover)


def test_select_orders_uses_each_shards_prior():
    config = S3TConfig(lora=LoraConfig(), num_shards=2, num_slices=3, budget=1, strategy="bms",
                       deletion_prior=[[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]])
    assert select_orders(config) == [[(2, 1, 0)], [(0, 1, 2)]]
    cyclic = S3TConfig(lora=LoraConfig(), num_shards=3, num_slices=3, budget=2)
    assert select_orders(cyclic) == [cyclic_orders(3, 2)] * 3


@pytest.mark.parametrize(
    "prior,message",
    [([0.5, 0.5], "num_slices=3"), ([0.5, 0.6, -0.1], "probabilities"), ([0.2, 0.2, 0.2], "probabilities"),
     ([[0.2, 0.3, 0.5]] * 3, "rows")],
)
def test_bad_deletion_priors_are_rejected(prior, message):
    with pytest.raises(ValueError, match=message):
        S3TConfig(lora=LoraConfig(), num_shards=2, num_slices=3, strategy="bms", deletion_prior=prior)


def test_prior_requires_bms_and_bms_budget_above_l_needs_small_l():
    with pytest.raises(ValueError, match="only used by strategy='bms'"):
        S3TConfig(lora=LoraConfig(), num_slices=2, deletion_prior=[0.5, 0.5])
    with pytest.raises(ValueError, match="L <= 8"):
        S3TConfig(lora=LoraConfig(), num_slices=9, budget=10, strategy="bms")
