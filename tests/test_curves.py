"""Successive-request curves: one point before any request and one after each."""

from __future__ import annotations

import pytest

from peft_mape.evaluation import RequestCurve, split_into_requests, successive_request_curve


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
