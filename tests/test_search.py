"""Mask search: budgets, determinism and the greedy rearrangement."""

from __future__ import annotations

import math

import pytest
import torch

from peft_mape.unlearning.search import random_selection, rearrange_layer, search_units, warm_start


def _stats(seed=0, layers=3, heads=6, filters=20, batch=16, forget_batch=4):
    """Per-example mask gradients [examples, layers, units] of a forget and a retain set."""
    g = torch.Generator().manual_seed(seed)
    forget = {"heads": torch.randn(forget_batch, layers, heads, generator=g),
              "filters": torch.randn(forget_batch, layers, filters, generator=g)}
    retain = {"heads": torch.randn(batch, layers, heads, generator=g),
              "filters": torch.randn(batch, layers, filters, generator=g)}
    return forget, retain


def _objective(frozen: torch.Tensor, g: torch.Tensor, G: torch.Tensor) -> float:
    """J(P) = sum_P g + 1/(2B) ||sum_P G||^2 for one layer."""
    s = G[:, frozen].sum(1)
    return float(g[frozen].sum() + s.dot(s) / (2 * G.shape[0]))


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.99])
def test_per_type_budget_respected(sparsity):
    forget, retain = _stats()
    result = search_units(forget, retain, sparsity=sparsity)
    for kind, mask in result.masks.items():
        allowed = max(1, math.floor((1 - sparsity) * mask.numel() + 1e-9))
        assert int(mask.sum()) == allowed, kind


def test_units_restriction():
    forget, retain = _stats()
    heads_only = search_units(forget, retain, sparsity=0.5, units="heads")
    assert heads_only.masks["filters"].sum() == 0 and heads_only.masks["heads"].sum() > 0
    filters_only = search_units(forget, retain, sparsity=0.5, units="filters")
    assert filters_only.masks["heads"].sum() == 0 and filters_only.masks["filters"].sum() > 0


def test_pooled_and_param_weighted_budgets():
    forget, retain = _stats()
    scores = {k: v.sum(0) + 0.5 * retain[k].pow(2).mean(0) for k, v in forget.items()}
    pooled = warm_start(scores, 0.75, "pooled")
    total = sum(s.numel() for s in scores.values())
    assert sum(int(m.sum()) for m in pooled.values()) == math.floor(0.25 * total)
    params = {"heads": 100, "filters": 7}
    weighted = warm_start(scores, 0.75, "param_weighted", params)
    spent = sum(int(weighted[k].sum()) * params[k] for k in params)
    budget = 0.25 * sum(scores[k].numel() * params[k] for k in params)
    assert 0 < spent <= budget
    with pytest.raises(ValueError, match="accounting"):
        warm_start(scores, 0.75, "mystery")


def test_same_inputs_same_selection():
    forget, retain = _stats(seed=3)
    a = search_units(forget, retain, sparsity=0.8).selection()
    b = search_units(forget, retain, sparsity=0.8).selection()
    assert a == b
    ties = {"heads": torch.zeros(1, 2, 4), "filters": torch.zeros(1, 2, 4)}
    zeros = {"heads": torch.zeros(3, 2, 4), "filters": torch.zeros(3, 2, 4)}
    assert search_units(ties, zeros, sparsity=0.5).selection() == search_units(ties, zeros, sparsity=0.5).selection()


def test_rearrangement_never_raises_the_objective_and_keeps_counts():
    for seed in range(5):
        forget, retain = _stats(seed=seed)
        g, G = forget["filters"][:, 0].sum(0), retain["filters"][:, 0]
        start = torch.zeros(20, dtype=torch.bool)
        start[torch.sort(-(g + 0.5 * G.pow(2).mean(0)), stable=True).indices[:5]] = True
        after = rearrange_layer(start, g, G, rounds=2)
        assert int(after.sum()) == 5
        assert _objective(~after, g, G) <= _objective(~start, g, G) + 1e-9


def test_rearrangement_finds_the_correlated_swap():
    """Unit 0's retain gradient cancels frozen unit 2's: freezing both is cheaper than the diagonal thinks."""
    B = 8
    base = torch.linspace(1, 2, B)
    G = torch.stack([base, torch.zeros(B), -0.5 * base, torch.zeros(B)], 1)
    g = torch.tensor([0.0, 1.0, 0.0, 0.1])
    diagonal = g + G.pow(2).mean(0) / 2
    selected = torch.zeros(4, dtype=torch.bool)
    selected[torch.sort(-diagonal, stable=True).indices[:2]] = True
    assert selected.tolist() == [True, True, False, False]
    after = rearrange_layer(selected, g, G)
    assert after.tolist() == [False, True, False, True]
    assert _objective(~after, g, G) < _objective(~selected, g, G)


@pytest.mark.parametrize("objective", ["mlr", "mlf", "norm"])
@pytest.mark.parametrize("accounting", ["per_type", "pooled", "param_weighted"])
def test_every_objective_respects_the_budget(objective, accounting):
    forget, retain = _stats(seed=1)
    params = {"heads": 40, "filters": 9}
    result = search_units(forget, retain, sparsity=0.75, accounting=accounting, unit_params=params, objective=objective)
    total = {k: m.numel() for k, m in result.masks.items()}
    chosen = result.counts()
    if accounting == "per_type":
        assert all(chosen[k] == math.floor(0.25 * total[k]) for k in total)
    elif accounting == "pooled":
        assert sum(chosen.values()) == math.floor(0.25 * sum(total.values()))
    else:
        assert 0 < sum(chosen[k] * params[k] for k in params) <= 0.25 * sum(total[k] * params[k] for k in params)


def test_mlf_swaps_the_roles_of_the_sets():
    forget, retain = _stats(seed=2)
    swapped = search_units(retain, forget, sparsity=0.7, objective="mlr")
    mlf = search_units(forget, retain, sparsity=0.7, objective="mlf")
    assert mlf.selection() == swapped.selection()
    assert mlf.selection() != search_units(forget, retain, sparsity=0.7).selection()


def test_norm_ranks_by_summed_absolute_forget_gradient_without_retain():
    forget = {"heads": torch.zeros(2, 1, 4), "filters": torch.zeros(2, 1, 4)}
    # Unit 1 has a large gradient of opposite signs (signed sum 0): NORM must still pick it.
    forget["heads"][0, 0] = torch.tensor([0.1, 5.0, 0.2, 0.0])
    forget["heads"][1, 0] = torch.tensor([0.1, -5.0, 0.2, 0.0])
    result = search_units(forget, None, sparsity=0.5, units="heads", objective="norm")
    assert result.selection()["heads"] == {"0": [1, 2]}
    assert torch.allclose(result.scores["heads"][0], torch.tensor([0.2, 10.0, 0.4, 0.0]))
    with pytest.raises(ValueError, match="needs retain statistics"):
        search_units(forget, None, sparsity=0.5, objective="mlr")
    with pytest.raises(ValueError, match="objective"):
        search_units(forget, None, sparsity=0.5, objective="mystery")


def test_random_selection_is_seeded_and_budgeted():
    shapes = {"heads": (3, 6), "filters": (3, 20)}
    a = random_selection(shapes, 0.8, seed=1)
    assert a.selection() == random_selection(shapes, 0.8, seed=1).selection()
    assert a.selection() != random_selection(shapes, 0.8, seed=2).selection()
    assert a.counts() == {"heads": math.floor(0.2 * 18), "filters": math.floor(0.2 * 60)}
