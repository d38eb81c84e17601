import pytest

from peft_mape.s3t import cyclic_orders, deletion_capacity, harmonic, simulate_deletion_capacity


def test_closed_form_values():
    assert deletion_capacity(1, 1, 1) == pytest.approx(1.0)
    assert deletion_capacity(2, 3, 1) == pytest.approx(6 * 1.5)
    # B' = min(B, L): a budget above L adds no capacity.
    assert deletion_capacity(2, 3, 5) == pytest.approx(6 * harmonic(6)) == pytest.approx(deletion_capacity(2, 3, 3))
    assert harmonic(4) == pytest.approx(1 + 1 / 2 + 1 / 3 + 1 / 4)


def test_sisa_capacity_is_the_budget_one_case():
    m, L = 4, 3
    assert deletion_capacity(m, L, 1) == pytest.approx(m * L * harmonic(m))
    assert deletion_capacity(m, L, L) > deletion_capacity(m, L, 1)


@pytest.mark.parametrize("strategy", ["cyclic", "bms"])
@pytest.mark.parametrize("m,L,B", [(1, 4, 1), (2, 3, 1), (2, 3, 3), (3, 4, 2), (4, 2, 2), (5, 5, 3), (3, 3, 6)])
def test_monte_carlo_matches_closed_form_within_5_percent(strategy, m, L, B):
    closed = deletion_capacity(m, L, B)
    simulated = deletion_capacity(m, L, B, method="monte_carlo", strategy=strategy, trials=2000, seed=1)
    assert abs(simulated - closed) / closed < 0.05


def test_simulation_depends_on_distinct_first_slices():
    # Three orders that all start with slice 0 behave like one order per shard: capacity mL·H_m.
    same_start = [[(0, 1, 2), (0, 2, 1)] for _ in range(3)]
    simulated = simulate_deletion_capacity(same_start, 3, trials=2000, seed=0)
    assert abs(simulated - deletion_capacity(3, 3, 1)) / deletion_capacity(3, 3, 1) < 0.05
    rotations = [cyclic_orders(3, 2) for _ in range(3)]
    assert simulate_deletion_capacity(rotations, 3, trials=2000, seed=0) > 1.2 * simulated


def test_skewed_prior_changes_the_simulated_capacity():
    uniform = deletion_capacity(2, 4, 1, method="monte_carlo", strategy="bms", seed=0)
    skewed = deletion_capacity(2, 4, 1, method="monte_carlo", strategy="bms",
                               deletion_prior=[0.7, 0.1, 0.1, 0.1], seed=0)
    # bms puts a rarely deleted slice first, so shards survive far longer than under uniform odds.
    assert skewed > 2 * uniform


@pytest.mark.parametrize(
    "kwargs,message",
    [({"method": "exact"}, "method"), ({"trials": 0}, "trials"),
     ({"deletion_prior": [0.5, 0.5], "strategy": "bms"}, "uniform"), ({"budget": 7}, "L!")],
)
def test_bad_capacity_arguments(kwargs, message):
    args = {"num_shards": 2, "num_slices": 2 if "deletion_prior" in kwargs else 3, "budget": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        deletion_capacity(**args)
