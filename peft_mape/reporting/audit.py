"""Audit report of one erasure request, saved beside its adapter as ``audit_report.json``.

What a data-protection audit needs to see, and nothing it must not: which set was erased
(a fingerprint — a hash over the examples' contents, never the contents), how (method,
hyperparameters, the selected heads and filters), what it achieved (losses and metrics before /
after, and against a retrained model when one was measured), when, with which library versions,
and the guarantee: **approximate** — the model was edited to behave like a retrained one, it was
not retrained, so no exactness is claimed (S3T deletions are the exact alternative).

The forget-set fingerprint is the SHA-256 of the sorted per-example content hashes
(:func:`peft_mape.common.data.fingerprint`: field names, shapes and values of the model-ready example,
padding excluded), the same value as the request log's ``forget_set_hash``. It does not depend
on the order of the examples; it does depend on tokenisation (the same texts tokenised
differently are different examples to the model).
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Optional, Union

from ..common.data import FORWARD_ALIASES, fingerprint, forward_arguments, materialise, set_fingerprint
from ..evaluation.suite import metric_gaps
from .inspection import selection_summary
from ..unlearning.report import UnlearnReport
from ..common.files import atomic_write, read_json

AUDIT_FILE = "audit_report.json"
SCHEMA = "peft-mape/audit-report/1"
GUARANTEE = "approximate"
# Report fields that describe the outcome (copied as they are); scores and warnings are left out:
# scores are large and say nothing an auditor can check; warnings are free text.
_OUTCOME_FIELDS = ("forget_loss_before", "forget_loss_after", "retain_loss_before", "retain_loss_after",
                   "update_norm", "steps", "stopped_early", "forget_loss_target", "trainable_parameters")


def forget_set_fingerprint(examples) -> dict:
    """``{"algorithm", "num_examples", "fingerprint"}`` of a list of model-ready examples."""
    hashes = sorted(fingerprint(e) for e in examples)
    if not hashes:
        raise ValueError("the forget set is empty: there is nothing to fingerprint")
    return {"algorithm": "sha256 of sorted per-example sha256 content hashes", "num_examples": len(hashes),
            "fingerprint": set_fingerprint(hashes)}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("peft-mape", "peft", "transformers", "torch"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "unknown"
    return out


def build_audit_report(report: Union[UnlearnReport, dict], forget, *, model=None, model_id: Optional[str] = None,
                       architecture: Optional[dict] = None, metrics_before: Optional[dict] = None,
                       metrics_after: Optional[dict] = None, metrics_retrain: Optional[dict] = None,
                       request_id: Optional[str] = None) -> dict:
    """The audit report (a JSON-serialisable dict) of one request.

    Args:
        report: the :class:`UnlearnReport` of ``unlearn()`` (or a baseline's report dict).
        forget: the forget set as given to ``unlearn()`` (Dataset, list of model-ready dicts or
            DataLoader). Only its hash is kept; text columns are ignored.
        model: the model, to hash exactly the fields it consumes (as ``unlearn()`` sees them);
            without it the usual model-input names are used.
        model_id: a name or path of the base model, recorded as given.
        architecture: ``{"num_layers", "num_heads", "num_filters"}`` for the selection summary
            (see :func:`peft_mape.reporting.inspection.architecture_sizes`).
        metrics_*: flat metric dicts (e.g. :func:`peft_mape.evaluation.classification_metrics`)
            of the original model, the unlearned one and a retrained one.
    """
    data = report.to_dict() if isinstance(report, UnlearnReport) else dict(report)
    allowed = forward_arguments(model) if model is not None else set(FORWARD_ALIASES)
    examples = materialise(forget, allowed, what="forget")
    sizes = architecture or {}
    selection = {"heads": data.get("selected_heads"), "filters": data.get("selected_filters")}
    audit = {
        "schema": SCHEMA,
        "request_id": request_id,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "guarantee": GUARANTEE,
        "model": model_id,
        "adapter_name": data.get("adapter_name"),
        "forget_set": forget_set_fingerprint(examples),
        "num_retain_examples": data.get("num_retain"),
        "method": data.get("method"),
        "hyperparameters": {"sparsity": data.get("sparsity"), "units": data.get("units"),
                            **(data.get("hyperparameters") or {})},
        "selection": selection_summary(selection, num_layers=sizes.get("num_layers"),
                                       num_heads=sizes.get("num_heads"), num_filters=sizes.get("num_filters"))
        if "selected_heads" in data else None,
        "outcome": {k: data.get(k) for k in _OUTCOME_FIELDS if k in data},
        "seconds": data.get("seconds"),
        "metrics": {"before": metrics_before, "after": metrics_after, "retrain": metrics_retrain,
                    "after_minus_retrain": metric_gaps(metrics_after, metrics_retrain) if metrics_after else {}},
        "versions": _versions(),
    }
    return audit


# EditReport fields an auditor can check: how the edit was computed and what it changed.
_EDIT_SETTINGS = ("num_train_examples", "num_train_examples_source", "hessian_examples", "damping", "damping_rule",
                  "curvature", "solver")
_EDIT_OUTCOME = ("losses_before", "losses_after", "scale", "update_norm", "full_step_norm", "relative_residual",
                 "negative_curvature", "solver_iterations", "linearisation_ratio", "retain_loss_budget")


def build_edit_audit_report(report, *, model_id: Optional[str] = None, adapter_id: Optional[str] = None,
                            request_id: Optional[str] = None) -> dict:
    """The audit report of one LLMEraser influence edit (:func:`peft_mape.llmeraser.erase`): the
    requests as fingerprints of the old and new examples (never their contents), the settings,
    the outcome, and the guarantee **approximate** (the adapter was edited, not retrained)."""
    data = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    return {
        "schema": SCHEMA,
        "request_id": request_id,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "guarantee": GUARANTEE,
        "model": model_id,
        "source_adapter": adapter_id,
        "adapter_name": data.get("edited_adapter"),
        "method": "llmeraser-influence-edit",
        "requests": data.get("requests"),
        "hyperparameters": {k: data.get(k) for k in _EDIT_SETTINGS},
        "outcome": {k: data.get(k) for k in _EDIT_OUTCOME},
        "seconds": data.get("seconds"),
        "versions": _versions(),
    }


def _json_scalar(value):
    if hasattr(value, "item"):  # numpy / torch scalars in metric dicts
        return value.item()
    raise TypeError(f"audit reports hold numbers and strings only, got {type(value).__name__}")


def save_audit_report(audit: dict, directory) -> Path:
    """Write ``audit`` to ``directory/audit_report.json`` atomically (temporary file, then rename)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot save the audit report: {directory} is not a directory "
                                "(save the adapter first)")
    target = directory / AUDIT_FILE

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(audit, f, indent=2, default=_json_scalar)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(target, write)
    return target


def load_audit_report(directory) -> dict:
    """Read ``directory/audit_report.json`` (or the file path itself)."""
    path = Path(directory)
    if path.is_dir():
        path = path / AUDIT_FILE
    return read_json(path, f"no audit report at {path}")
