"""PNG plots of selections, metrics and request curves (matplotlib, Agg canvas, no pyplot state).

- :func:`plot_selection`: selected heads (heads x layers heatmap) and selected filters per layer,
  from a :func:`peft_mape.reporting.inspection.selection_summary` — what ``peft-mape inspect --plot`` draws;
  :func:`plot_head_heatmap` / :func:`plot_filters_per_layer` draw one panel each.
- :func:`plot_metric_bars`: grouped bars of metrics for original / retrain / each method.
- :func:`plot_request_curves`: a metric after each of successive requests, one line per method.

Every function writes a PNG file and returns its path. Figures are drawn on an explicit Agg
canvas, so importing this module never changes the user's matplotlib backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

DPI = 120


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # matplotlib is an optional dependency (the dev extra has it)
        raise ImportError("plots need matplotlib: pip install matplotlib") from None
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG: the file name must end in .png, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def head_matrix(summary: dict) -> np.ndarray:
    """[heads, layers] 0/1 matrix of the selected heads of a selection summary."""
    heads = summary.get("heads_per_layer") or max(
        [h + 1 for row in summary["layers"] for h in row["heads"]], default=1)
    matrix = np.zeros((heads, summary["num_layers"]))
    for row in summary["layers"]:
        for h in row["heads"]:
            matrix[h, row["layer"]] = 1.0
    return matrix


def _draw_heads(axes, summary: dict) -> None:
    matrix = head_matrix(summary)
    axes.imshow(matrix, cmap="Greens", vmin=0, vmax=1, aspect="auto", origin="lower", interpolation="nearest")
    axes.set_xlabel("layer")
    axes.set_ylabel("head")
    axes.set_title(f"selected heads: {summary['num_selected_heads']}"
                   + (f" of {matrix.size}" if summary.get("heads_per_layer") else ""))
    _integer_ticks(axes.xaxis, matrix.shape[1])
    _integer_ticks(axes.yaxis, matrix.shape[0])


def _draw_filters(axes, summary: dict) -> None:
    layers = [row["layer"] for row in summary["layers"]]
    counts = [row["num_filters"] for row in summary["layers"]]
    axes.bar(layers, counts, color="tab:blue")
    total = summary.get("filters_per_layer")
    axes.set_xlabel("layer")
    axes.set_ylabel("selected filters" + (f" (of {total} per layer)" if total else ""))
    axes.set_title(f"selected filters: {summary['num_selected_filters']}")
    _integer_ticks(axes.xaxis, len(layers))


def _integer_ticks(axis, count: int) -> None:
    step = max(1, int(np.ceil(count / 16)))
    axis.set_ticks(range(0, count, step))


def plot_head_heatmap(summary: dict, path, title: Optional[str] = None) -> Path:
    """Heatmap of the selected heads (rows) per layer (columns)."""
    figure = _figure(max(4.0, 0.35 * summary["num_layers"] + 2), 3.5)
    axes = figure.add_subplot()
    _draw_heads(axes, summary)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_filters_per_layer(summary: dict, path, title: Optional[str] = None) -> Path:
    """Bar chart of the number of selected FFN filters in each layer."""
    figure = _figure(max(4.0, 0.35 * summary["num_layers"] + 2), 3.5)
    _draw_filters(figure.add_subplot(), summary)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def _as_summary(selection: dict, num_layers, num_heads, num_filters) -> dict:
    """A selection summary as is, or one built from a raw ``{"heads": ..., "filters": ...}`` selection."""
    if "layers" in selection:
        return selection
    from .inspection import selection_summary

    return selection_summary(selection, num_layers=num_layers, num_heads=num_heads, num_filters=num_filters)


def plot_selection(selection: dict, path, title: Optional[str] = None, *, num_layers: Optional[int] = None,
                   num_heads: Optional[int] = None, num_filters: Optional[int] = None) -> Path:
    """Both panels side by side: the head heatmap and the filters per layer.

    ``selection`` is a :func:`peft_mape.reporting.inspection.selection_summary`, or a raw selection
    ``{"heads": {layer: [...]}, "filters": {...}}`` (e.g. from an ``UnlearnReport``) with the
    model's sizes given as ``num_layers`` / ``num_heads`` / ``num_filters``.
    """
    summary = _as_summary(selection, num_layers, num_heads, num_filters)
    figure = _figure(max(8.0, 0.7 * summary["num_layers"] + 4), 3.8)
    left, right = figure.subplots(1, 2)
    _draw_heads(left, summary)
    _draw_filters(right, summary)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_metric_bars(rows: Union[Mapping[str, Mapping[str, float]], Sequence[Mapping]], metrics: Sequence[str],
                     path, title: Optional[str] = None, *, label_key: str = "method") -> Path:
    """Grouped bars: one group per metric, one bar per row (e.g. original, retrain, each method).

    ``rows`` maps a label to its metrics, or is a list of row dicts labelled by ``row[label_key]``
    (a results table); drawn in order; a missing metric is a gap.
    """
    if not isinstance(rows, Mapping):
        rows = {str(row[label_key]): row for row in rows}
    if not rows or not metrics:
        raise ValueError("plot_metric_bars needs at least one row and one metric")
    labels = list(rows)
    width = 0.8 / len(labels)
    figure = _figure(max(5.0, 1.2 * len(metrics) * max(1, len(labels) / 3) + 2), 4.0)
    axes = figure.add_subplot()
    x = np.arange(len(metrics))
    for i, label in enumerate(labels):
        values = [rows[label].get(m, np.nan) for m in metrics]
        axes.bar(x + (i - (len(labels) - 1) / 2) * width, values, width, label=label)
    axes.set_xticks(x, list(metrics))
    # below the axes, so the legend never hides a bar
    figure.legend(loc="outside lower center", fontsize="small", ncols=min(len(labels), 5))
    axes.grid(axis="y", alpha=0.3)
    if title:
        axes.set_title(title)
    return _save(figure, path)


def _curve_series(curves, metric: str) -> dict[str, tuple]:
    if isinstance(curves, Mapping):  # {label: (xs, ys)}
        return dict(curves)
    series = {}
    for curve in curves:
        if isinstance(curve, Mapping):  # RequestCurve.to_dict()
            from ..evaluation.curves import RequestCurve

            curve = RequestCurve.from_dict(curve)
        series[curve.label] = curve.series(metric)
    return series


def plot_request_curves(curves, metrics: Union[str, Sequence[str]], path, title: Optional[str] = None, *,
                        reference: Optional[Mapping[str, float]] = None, reference_label: str = "retrain") -> Path:
    """Metrics after each successive request, one line per method and one panel per metric.

    ``curves``: :class:`peft_mape.evaluation.RequestCurve` objects or their ``to_dict()``s, or
    ``{label: (xs, ys)}`` for a single metric. ``reference``: metric values of a reference model
    (e.g. retrained without every request), drawn as dashed horizontal lines.
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError("plot_request_curves needs at least one metric")
    figure = _figure(5.0 * len(metrics) + 1, 4.0)
    panels = figure.subplots(1, len(metrics), squeeze=False)[0]
    for axes, metric in zip(panels, metrics):
        series = _curve_series(curves, metric)
        if not series:
            raise ValueError("plot_request_curves needs at least one curve")
        for label, (xs, ys) in series.items():
            axes.plot(xs, ys, marker="o", label=label)
        if reference is not None and reference.get(metric) is not None:
            axes.axhline(float(reference[metric]), color="black", linestyle="--", linewidth=1, label=reference_label)
        axes.set_xlabel("requests served")
        axes.set_ylabel(metric)
        axes.grid(alpha=0.3)
    panels[0].legend(fontsize="small")
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_tradeoff(trajectories: Mapping[str, Sequence[Mapping]], path, *, x: str = "forget_acc", y: str = "test_acc",
                  reference: Optional[Mapping[str, float]] = None, reference_label: str = "retrain",
                  title: Optional[str] = None) -> Path:
    """Forgetting against utility along each method's update, one line per method (its first
    point: the model before the update), and the reference model (retrained) as a star."""
    if not trajectories:
        raise ValueError("plot_tradeoff needs at least one trajectory")
    figure = _figure(6.0, 4.5)
    axes = figure.add_subplot()
    for label, points in trajectories.items():
        rows = [(p[x], p[y]) for p in points if p.get(x) is not None and p.get(y) is not None]
        if rows:
            axes.plot(*zip(*rows), marker=".", label=label)
    if reference is not None and reference.get(x) is not None and reference.get(y) is not None:
        axes.plot([reference[x]], [reference[y]], marker="*", markersize=14, color="black", linestyle="none",
                  label=reference_label)
        axes.axvline(float(reference[x]), color="black", linestyle=":", linewidth=1)
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    if title:
        axes.set_title(title)
    return _save(figure, path)
