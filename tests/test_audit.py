"""Audit reports: contents, no leak of the forget set, stable fingerprints, atomic save."""

from __future__ import annotations

import hashlib
import json

import datasets
import pytest
import torch
from peft import get_peft_model

from peft_mape import MAPEConfig
from peft_mape.reporting.audit import (
    AUDIT_FILE, build_audit_report, forget_set_fingerprint, load_audit_report, save_audit_report,
)
from peft_mape.common.data import fingerprint
from peft_mape.reporting.inspection import architecture_sizes

from conftest import tiny_examples, tiny_model

SECRET = "Alice Example lives at 12 Hidden Lane and her password is hunter2"


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _forget_dataset():
    """A tokenised forget set that still carries its raw text column (as datasets usually do)."""
    examples = tiny_examples("bert", 4, seed=1, vary_length=False)
    return datasets.Dataset.from_dict({
        "text": [f"{SECRET} #{i}" for i in range(4)],
        "input_ids": [e["input_ids"].tolist() for e in examples],
        "attention_mask": [e["attention_mask"].tolist() for e in examples],
        "labels": [int(e["labels"]) for e in examples],
    })


def _unlearned():
    model = get_peft_model(tiny_model("bert"), MAPEConfig(sparsity=0.5))
    forget = _forget_dataset()
    report = model.unlearn(forget, tiny_examples("bert", 8, seed=2), method="ga", max_steps=2, progress=False,
                           selection={"heads": {"1": [0, 3]}, "filters": {"0": [5]}})
    return model, forget, report


def test_audit_report_records_the_request_without_its_contents(tmp_path):
    model, forget, report = _unlearned()
    before = {"forget_acc": 0.75, "test_acc": 0.5}
    after = {"forget_acc": 0.25, "test_acc": 0.5}
    retrain = {"forget_acc": 0.5, "test_acc": 0.5}
    audit = build_audit_report(report, forget, model=model, model_id="tiny-bert",
                               architecture=architecture_sizes(model),
                               metrics_before=before, metrics_after=after, metrics_retrain=retrain, request_id="req-42")
    model.save_pretrained(tmp_path / "adapter")
    path = save_audit_report(audit, tmp_path / "adapter")
    assert path == tmp_path / "adapter" / AUDIT_FILE
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.name.startswith(".")) == []  # no temp left
    text = path.read_text()
    for word in ("Alice", "Hidden Lane", "hunter2", "password"):
        assert word not in text
    ids = forget["input_ids"][0]
    assert json.dumps(ids) not in text and json.dumps(ids, separators=(",", ":")) not in text
    loaded = load_audit_report(tmp_path / "adapter")
    assert loaded["guarantee"] == "approximate" and loaded["request_id"] == "req-42"
    assert loaded["method"] == "ga" and loaded["hyperparameters"]["sparsity"] == 0.5
    assert loaded["hyperparameters"]["max_steps"] == 2
    assert loaded["forget_set"]["num_examples"] == 4
    assert loaded["selection"]["num_selected_heads"] == 2 and loaded["selection"]["num_selected_filters"] == 1
    assert loaded["selection"]["heads_per_layer"] == 4 and loaded["selection"]["layers"][1]["heads"] == [0, 3]
    assert loaded["metrics"]["after_minus_retrain"] == {"forget_acc": -0.25, "test_acc": 0.0}
    assert loaded["outcome"]["forget_loss_after"] == pytest.approx(report.forget_loss_after)
    assert "scores" not in text


def test_fingerprint_is_order_free_and_content_sensitive():
    examples = tiny_examples("bert", 5, seed=3)
    first = forget_set_fingerprint(examples)
    assert forget_set_fingerprint(list(reversed(examples)))["fingerprint"] == first["fingerprint"]
    # the request log's scheme: sha256 over the sorted per-example hashes
    expected = hashlib.sha256("".join(sorted(fingerprint(e) for e in examples)).encode()).hexdigest()
    assert first["fingerprint"] == expected
    changed = [dict(e) for e in examples]
    changed[2] = {**changed[2], "labels": (changed[2]["labels"] + 1) % 3}
    assert forget_set_fingerprint(changed)["fingerprint"] != first["fingerprint"]
    with pytest.raises(ValueError, match="forget set is empty"):
        forget_set_fingerprint([])


def test_text_columns_do_not_change_the_fingerprint():
    forget = _forget_dataset()
    report = {"method": "salun-ga", "forget_loss_before": 1.0, "forget_loss_after": 2.0, "seconds": {"update": 1.0}}
    with_text = build_audit_report(report, forget)
    without_text = build_audit_report(report, forget.remove_columns("text"))
    assert with_text["forget_set"] == without_text["forget_set"]
    assert with_text["selection"] is None and with_text["outcome"] == {"forget_loss_before": 1.0,
                                                                       "forget_loss_after": 2.0}


def test_save_needs_an_existing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="save the adapter first"):
        save_audit_report({"guarantee": "approximate"}, tmp_path / "missing")
    with pytest.raises(TypeError, match="numbers and strings only"):
        save_audit_report({"x": object()}, tmp_path)
    assert not list(tmp_path.iterdir())  # the failed write left nothing behind
    save_audit_report({"x": torch.tensor(1.5)}, tmp_path)
    assert load_audit_report(tmp_path / AUDIT_FILE) == {"x": 1.5}


def test_architecture_sizes_of_plain_and_peft_models():
    from peft_mape.reporting.inspection import architecture_sizes, format_selection, selection_summary, sizes_from_config

    model = tiny_model("gpt2")
    assert architecture_sizes(model) == {"num_layers": 2, "num_heads": 4, "num_filters": 24}
    assert architecture_sizes(get_peft_model(model, MAPEConfig())) == {"num_layers": 2, "num_heads": 4,
                                                                       "num_filters": 24}
    assert sizes_from_config({"n_layer": 3, "n_head": 2, "n_embd": 8, "n_inner": None}) == \
        {"num_layers": 3, "num_heads": 2, "num_filters": 32}
    table = format_selection(selection_summary({"heads": {"1": [2]}, "filters": {"0": [1, 4]}}, num_layers=2,
                                               num_heads=4, num_filters=24))
    assert table.splitlines()[1:] == ["    0      0/4         2/24  -", "    1      1/4         0/24  [2]",
                                      "total      1/8         2/48"]
