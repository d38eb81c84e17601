"""Plots: PNG files are written, non-empty, and bad input is named."""

from __future__ import annotations

import numpy as np
import pytest

from peft_mape.evaluation import RequestCurve
from peft_mape.reporting.inspection import selection_summary
from peft_mape.reporting.plots import (
    head_matrix, plot_filters_per_layer, plot_head_heatmap, plot_metric_bars, plot_request_curves, plot_selection,
    plot_tradeoff,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return data.startswith(PNG_MAGIC) and len(data) > 1000


@pytest.fixture
def summary():
    return selection_summary({"heads": {"0": [1], "2": [0, 3]}, "filters": {1: [4, 5, 6]}},
                             num_layers=3, num_heads=4, num_filters=24)


def test_head_matrix_marks_the_selected_heads(summary):
    matrix = head_matrix(summary)
    assert matrix.shape == (4, 3)
    assert list(zip(*np.nonzero(matrix))) == [(0, 2), (1, 0), (3, 2)]


def test_selection_plots_are_pngs(tmp_path, summary):
    for fn in (plot_selection, plot_head_heatmap, plot_filters_per_layer):
        path = fn(summary, tmp_path / f"{fn.__name__}.png", title="request 1")
        assert _is_png(path)
    # totals unknown (no architecture): still drawable from the selection alone
    assert _is_png(plot_selection(selection_summary({"heads": {"1": [2]}}), tmp_path / "bare.png"))


def test_metric_bars_and_request_curves(tmp_path):
    rows = {"original": {"forget_acc": 0.9, "test_acc": 0.7}, "retrain": {"forget_acc": 0.7, "test_acc": 0.7},
            "MAPE": {"forget_acc": 0.72, "test_acc": 0.71}, "LoRA-GA": {"forget_acc": 0.6}}
    assert _is_png(plot_metric_bars(rows, ["forget_acc", "test_acc"], tmp_path / "bars.png"))
    curve = RequestCurve("MAPE", [{"request": 0, "test_acc": 0.7}, {"request": 1, "test_acc": 0.69}])
    assert _is_png(plot_request_curves([curve], "test_acc", tmp_path / "curves.png"))
    assert _is_png(plot_request_curves({"full GA": ([0, 1, 2], [0.7, 0.6, 0.5])}, "test_acc", tmp_path / "c2.png"))


def test_bad_plot_input_is_named(tmp_path, summary):
    with pytest.raises(ValueError, match="must end in .png"):
        plot_selection(summary, tmp_path / "plot.jpg")
    with pytest.raises(ValueError, match="at least one row and one metric"):
        plot_metric_bars({}, ["test_acc"], tmp_path / "x.png")


def test_results_table_shapes_are_accepted(tmp_path):
    """The shapes a benchmark has at hand: row lists, raw selections, curve dicts, a retrain reference."""
    rows = [{"method": "original", "test_acc": 70.0}, {"method": "retrain (gold)", "test_acc": 69.0}]
    assert _is_png(plot_metric_bars(rows, ["test_acc"], tmp_path / "rows.png"))
    selection = {"heads": {"0": [1, 2]}, "filters": {"1": [3]}}
    assert _is_png(plot_selection(selection, tmp_path / "raw.png", num_layers=2, num_heads=4, num_filters=8))
    curves = [RequestCurve("MAPE", [{"request": 0, "forget_acc": 90, "test_acc": 70},
                                    {"request": 1, "forget_acc": 80, "test_acc": 69}]).to_dict()]
    path = plot_request_curves(curves, ["forget_acc", "test_acc"], tmp_path / "multi.png",
                               reference={"forget_acc": 75.0, "test_acc": 70.0})
    assert _is_png(path)
    with pytest.raises(ValueError, match="at least one metric"):
        plot_request_curves(curves, [], tmp_path / "none.png")


def test_tradeoff_plot(tmp_path):
    trajectories = {"MAPE": [{"forget_acc": 90, "test_acc": 70}, {"forget_acc": 70, "test_acc": 69}],
                    "full": [{"forget_acc": 90, "test_acc": 70}, {"forget_acc": 60, "test_acc": 62}]}
    path = plot_tradeoff(trajectories, tmp_path / "tradeoff.png", reference={"forget_acc": 72, "test_acc": 70})
    assert _is_png(path)
    with pytest.raises(ValueError, match="at least one trajectory"):
        plot_tradeoff({}, tmp_path / "none.png")
