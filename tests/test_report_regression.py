"""Same seed, same inputs -> the same ``UnlearnReport`` numbers, for every method on tiny models.

The expected numbers in ``data/report_regression.json`` were recorded from the library before the
core restructuring (methods as units, public phases); any change of behaviour shows up here.
Record them again only for an intended change of results:

    python tests/test_report_regression.py --record
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from peft_mape import MAPEConfig

sys.path.insert(0, str(Path(__file__).parent))
from conftest import memorised_model, tiny_examples  # noqa: E402

RECORD = Path(__file__).parent / "data" / "report_regression.json"
KINDS = ("bert", "llama")
# name -> unlearn() keyword arguments; every method, the KL term, fixed selections, objectives,
# early stopping on a holdout.
CASES = {
    "graddiff": dict(method="graddiff", lr=1e-2, max_steps=4),
    "ga": dict(method="ga", lr=1e-2, max_steps=4),
    "npo": dict(method="npo", lr=1e-2, max_steps=4),
    "graddiff-kl": dict(method="graddiff", lr=1e-2, max_steps=4, kl_weight=0.5),
    "so": dict(method="so"),
    "influence": dict(method="influence"),
    # the specification's scale-1 steps, without the line search (recorded before it existed)
    "so-spec": dict(method="so", line_search=False),
    "influence-spec": dict(method="influence", line_search=False),
    "all-graddiff": dict(method="graddiff", selection="all", max_steps=3),
    "random-ga": dict(method="ga", selection="random", lr=1e-2, max_steps=3),
    "mlf-ga": dict(method="ga", objective="mlf", lr=1e-2, max_steps=3),
    "norm-graddiff": dict(method="graddiff", objective="norm", lr=1e-2, max_steps=3),
    "holdout-graddiff": dict(method="graddiff", lr=1e-2, max_steps=20, holdout="holdout"),
}
FLOATS = ("forget_loss_before", "forget_loss_after", "retain_loss_before", "retain_loss_after", "update_norm",
          "forget_loss_target")
EXACT = ("method", "num_forget", "num_retain", "selected_heads", "selected_filters", "trainable_parameters",
         "steps", "stopped_early")


def run_case(kind: str, case: str) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the summation order of a float reduction depends on the thread count
    try:
        model, forget, retain = memorised_model(kind, epochs=6, lr=1e-2)
        options = dict(CASES[case])
        if options.get("holdout") == "holdout":
            options["holdout"] = tiny_examples(kind, 8, seed=11)
        peft_model = get_peft_model(model, MAPEConfig(sparsity=0.5))
        report = peft_model.unlearn(forget, retain, seed=0, progress=False, **options)
    finally:
        torch.set_num_threads(previous)
    values = report.to_dict()
    out = {key: values[key] for key in FLOATS + EXACT}
    residual = report.diagnostics.get("relative_residual")
    out["relative_residual"] = residual
    return out


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", KINDS)
def test_report_numbers_are_unchanged(kind, case):
    expected = json.loads(RECORD.read_text())[f"{kind}/{case}"]
    got = run_case(kind, case)
    for key in EXACT:
        assert got[key] == expected[key], f"{key}: {got[key]!r} != recorded {expected[key]!r}"
    for key in FLOATS + ("relative_residual",):
        assert _close(got[key], expected[key]), f"{key}: {got[key]!r} != recorded {expected[key]!r}"


if __name__ == "__main__" and "--record" in sys.argv:
    results = {f"{kind}/{case}": run_case(kind, case) for kind in KINDS for case in CASES}
    RECORD.parent.mkdir(exist_ok=True)
    RECORD.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(f"recorded {len(results)} reports in {RECORD}")
