"""What a MAPE adapter selected, per layer: read from a report, a live model or the saved files.

A *selection* is ``{"heads": {layer: [head, ...]}, "filters": {layer: [filter, ...]}}`` (layer
keys ints or strings), as written by ``unlearn()`` into the adapter config. The summary adds the
per-layer counts and the model's totals (heads and filters per layer) when they are known.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..common.files import read_json

ADAPTER_CONFIG = "adapter_config.json"
# transformers config attributes holding layer / head / FFN sizes, by family
_LAYER_ATTRS = ("num_hidden_layers", "n_layer", "n_layers")
_HEAD_ATTRS = ("num_attention_heads", "n_head", "n_heads")
_FILTER_ATTRS = ("intermediate_size", "n_inner", "hidden_dim")


def _layer_dict(part) -> dict[int, list[int]]:
    return {int(k): sorted(int(i) for i in v) for k, v in (part or {}).items()}


def selection_summary(selection: Optional[dict], *, num_layers: Optional[int] = None, num_heads: Optional[int] = None,
                      num_filters: Optional[int] = None) -> dict:
    """Per-layer selected heads (indices) and filter counts, with totals; JSON-serialisable.

    ``num_*`` are the model's sizes (layers, heads per layer, filters per layer); when unknown,
    the layer count falls back to the highest selected layer + 1 and the per-layer totals are None.
    """
    selection = selection or {}
    heads, filters = _layer_dict(selection.get("heads")), _layer_dict(selection.get("filters"))
    seen = max([*heads, *filters], default=-1) + 1
    layers = max(seen, num_layers or 0)
    return {
        "num_layers": layers,
        "heads_per_layer": num_heads,
        "filters_per_layer": num_filters,
        "num_selected_heads": sum(len(v) for v in heads.values()),
        "num_selected_filters": sum(len(v) for v in filters.values()),
        "layers": [
            {"layer": i, "heads": heads.get(i, []), "num_heads": len(heads.get(i, [])),
             "num_filters": len(filters.get(i, []))}
            for i in range(layers)
        ],
    }


def architecture_sizes(model) -> dict[str, int]:
    """``{"num_layers", "num_heads", "num_filters"}`` of a live model, as MAPE resolves its units.

    For a PeftModel with MAPE adapters, the active adapter's architecture overrides apply.
    """
    from ..tuner.architectures import resolve_architecture

    tuner = getattr(model, "base_model", None)
    arch = tuner.architecture() if hasattr(tuner, "architecture") else resolve_architecture(model, None)
    return {"num_layers": arch.num_layers, "num_heads": arch.num_heads, "num_filters": arch.num_filters}


def sizes_from_config(config: dict) -> dict[str, Optional[int]]:
    """Layer / head / filter counts read from a transformers ``config.json`` dict (None if absent)."""
    def first(attrs):
        return next((int(config[a]) for a in attrs if config.get(a)), None)

    filters = first(_FILTER_ATTRS)
    if filters is None and config.get("n_embd"):  # GPT-2: n_inner=None means 4 x n_embd
        filters = 4 * int(config["n_embd"])
    return {"num_layers": first(_LAYER_ATTRS), "num_heads": first(_HEAD_ATTRS), "num_filters": filters}


def read_adapter_config(adapter_dir) -> dict:
    """The adapter's ``adapter_config.json``, with a clear error when it is missing or malformed."""
    path = Path(adapter_dir)
    if path.is_dir():
        path = path / ADAPTER_CONFIG
    return read_json(path, f"no {ADAPTER_CONFIG} in {adapter_dir}: not a saved PEFT adapter directory")


def format_selection(summary: dict) -> str:
    """A per-layer text table of a :func:`selection_summary`."""
    heads_total, filters_total = summary.get("heads_per_layer"), summary.get("filters_per_layer")
    of = lambda n, total: f"{n}/{total}" if total else str(n)  # noqa: E731
    lines = [f"{'layer':>5}  {'heads':>7}  {'filters':>11}  selected heads"]
    for row in summary["layers"]:
        lines.append(f"{row['layer']:>5}  {of(row['num_heads'], heads_total):>7}  "
                     f"{of(row['num_filters'], filters_total):>11}  {row['heads'] if row['heads'] else '-'}")
    layers = summary["num_layers"]
    lines.append(f"total  {of(summary['num_selected_heads'], heads_total and heads_total * layers):>7}  "
                 f"{of(summary['num_selected_filters'], filters_total and filters_total * layers):>11}")
    return "\n".join(lines)
