"""Successive-request curves: one point before any request and one after each."""

from __future__ import annotations

import pytest

from peft_mape.evaluation import RequestCurve, split_into_requests, successive_request_curve, utility_at_forget_level


def test_curve_records_metrics_before_and_after_each_request():
    state = {"forgotten": 0}

    def apply(i, request):
        state["forgotten"] += len(request)
        return {"selected": i * 10, "note": "not a number"}

    requests = split_into_requests(list(range(7)), 3, seed=1)
    assert sorted(x for r in requests for x in r) == list(range(7))
    assert sorted(len(r) for r in requests) == [2, 2, 3]
    curve = successive_request_curve(requests, apply, lambda i: {"forgotten": state["forgotten"]}, label="toy")
    assert [p["request"] for p in curve.points] == [0, 1, 2, 3]
    xs, ys = curve.series("forgotten")
    assert xs == [0, 1, 2, 3] and ys[0] == 0 and ys[-1] == 7 and ys == sorted(ys)
    assert curve.points[2]["request_selected"] == 20 and "request_note" not in curve.points[2]
    assert all(p["seconds"] >= 0 for p in curve.points)
    assert RequestCurve.from_dict(curve.to_dict()) == curve
    with pytest.raises(KeyError, match="known: \\['forgotten', 'request_selected'\\]"):
        curve.series("test_acc")


def test_split_rejects_impossible_request_counts():
    with pytest.raises(ValueError, match="num_requests must be between 1 and"):
        split_into_requests([1, 2], 3)


def test_utility_at_the_retrained_forget_level_is_interpolated_between_checks():
    points = [{"step": 0, "forget_acc": 90, "test_acc": 70}, {"step": 10, "forget_acc": 80, "test_acc": 69},
              {"step": 20, "forget_acc": 60, "test_acc": 65}, {"step": 30, "forget_acc": 40, "test_acc": 50}]
    matched = utility_at_forget_level(points, 70.0)
    assert matched["reached"] and matched["utility"] == pytest.approx(67.0) and matched["at"] == pytest.approx(1.5)
    assert matched["step"] == pytest.approx(15.0)
    # A forget loss rises with forgetting.
    losses = [{"forget_loss": 0.1, "retain_loss": 0.2}, {"forget_loss": 1.1, "retain_loss": 0.4}]
    up = utility_at_forget_level(losses, 0.6, forget="forget_loss", utility="retain_loss", forgetting_lowers=False)
    assert up["utility"] == pytest.approx(0.3)
    never = utility_at_forget_level(points[:2], 70.0)
    assert not never["reached"] and never["utility"] is None and never["closest"] == 80
    assert utility_at_forget_level(points, 95.0) == {"reached": True, "utility": 70.0, "at": 0.0, "step": 0,
                                                     "best": 70.0}
    with pytest.raises(ValueError, match="no point has both"):
        utility_at_forget_level([{"forget_acc": 1}], 0.5)


def test_best_utility_counts_only_points_still_past_the_level():
    """A trajectory that recovers utility while staying forgotten: ``best`` takes the recovery,
    not a later point that un-forgot, and follows the utility's direction."""
    points = [{"forget_acc": 90, "test_acc": 70, "test_loss": 0.5}, {"forget_acc": 60, "test_acc": 64, "test_loss": 0.9},
              {"forget_acc": 50, "test_acc": 68, "test_loss": 0.6}, {"forget_acc": 80, "test_acc": 71, "test_loss": 0.4}]
    matched = utility_at_forget_level(points, 70.0)
    assert matched["utility"] == pytest.approx(66.0) and matched["best"] == 68
    loss = utility_at_forget_level(points, 70.0, utility="test_loss", higher_is_better=False)
    assert loss["utility"] == pytest.approx(0.5 + 0.4 * 2 / 3) and loss["best"] == 0.6
    assert utility_at_forget_level(points[:1], 10.0)["best"] is None
