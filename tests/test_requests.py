"""Successive requests: memory-free and memory-aided modes, cached retain statistics, the request
log, and saving/reloading several request adapters together."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T
from peft import get_peft_model
from safetensors import safe_open

import peft_mape
from peft_mape import MAPEConfig
from peft_mape.common.data import fingerprint, pad_collate, per_example_losses
from peft_mape.common.stopping import retain_budget
from peft_mape.unlearning.statistics import RetainStatistics

from conftest import tiny_model
from test_methods import _memorised_lm

pytestmark = pytest.mark.usefixtures("one_thread")

# Deterministic closed-form updates make "equals a reference" an exact statement.
SO = dict(method="so", damping=1.0, scale=0.03, num_train_examples=30, progress=False)


@pytest.fixture(scope="module")
def memorised():
    torch.set_num_threads(1)
    return _memorised_lm()


def _peft(memorised, sparsity=0.5):
    model, forget, retain = memorised
    clone = tiny_model("llama")
    clone.load_state_dict(model.state_dict())
    return get_peft_model(clone.eval(), MAPEConfig(sparsity=sparsity)), forget, retain


def _logits(model, examples):
    with torch.no_grad():
        batch = pad_collate(examples)
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _mean_loss(model, examples):
    with torch.no_grad():
        return float(per_example_losses(model, pad_collate(examples), None).mean())


def _deltas(tuner, name):
    return [p.detach().clone() for p in tuner.adapter_parameters(name)]


def test_memory_free_requests_stack_adapters_and_log_them(memorised):
    model, forget, retain = _peft(memorised)
    training = forget + retain
    first = model.unlearn_request(forget[:3], training, **SO)
    second = model.unlearn_request(forget[3:], training, **SO)
    tuner = model.base_model
    assert tuner.active_adapters == ["default", "request-1", "request-2"]
    log = model.request_log
    assert log.names() == ["request-1", "request-2"] and [r.mode for r in log.records] == ["memory_free"] * 2
    assert log.removed() == {fingerprint(e) for e in forget}
    # The second request's retain set left out the first request's examples (and its own).
    assert second.num_retain == len(retain) and first.num_retain == len(retain) + 3
    assert any("removed by earlier requests" in w for w in second.warnings)
    # Contents never enter the log: only hashes.
    dumped = json.dumps(log.to_dict())
    assert str(forget[0]["input_ids"].tolist()) not in dumped
    # Both deltas act: outputs differ from the model with only the first request.
    both = _logits(model, forget)
    with tuner.muted(["request-2"]):
        only_first = _logits(model, forget)
    assert not torch.allclose(both, only_first)


def test_memory_aided_request_equals_a_from_original_reference(memorised):
    model, forget, retain = _peft(memorised)
    training = forget + retain
    stats = model.precompute_retain_statistics(training, progress=False)
    assert len(stats) == len(training)
    model.unlearn_request(forget[:3], training, mode="memory_aided", **SO)
    model.unlearn_request(forget[3:], training, mode="memory_aided", **SO)
    aided = _deltas(model.base_model, "request-2")
    assert model.base_model.peft_config["request-2"].selection

    # Reference: the original model, one request erasing forget[3:] with forget[:3] already gone.
    reference, _, _ = _peft(memorised)
    reference.unlearn(forget[3:], retain, **SO)
    assert reference.base_model.peft_config["default"].selection == model.base_model.peft_config["request-2"].selection
    for a, b in zip(aided, _deltas(reference.base_model, "default")):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_memory_aided_requests_share_one_retain_budget_measured_with_every_delta(memorised):
    """Memory-aided deltas are computed at the original weights but add up: each request's trust
    region measures the retain loss with the earlier deltas applied, against one budget relative
    to the original model's retain loss."""
    model, forget, retain = _peft(memorised)
    training = forget + retain
    tuner = model.base_model
    model.precompute_retain_statistics(training, progress=False)
    model.unlearn_request(forget[:3], training, mode="memory_aided", progress=False)
    report = model.unlearn_request(forget[3:], training, mode="memory_aided", progress=False)
    with tuner.muted(["request-1", "request-2"]):
        original = _mean_loss(model, retain)
    budget = report.diagnostics["stopping"]["retain_loss_budget"]
    assert budget == pytest.approx(retain_budget(original, 1.0), rel=1e-4)
    assert _mean_loss(model, retain) <= budget + 1e-5  # both deltas together
    # The update itself still ran at the original weights (the mode's contract).
    assert report.retain_loss_before == pytest.approx(original, rel=1e-4)


def test_a_memory_aided_request_after_the_budget_is_spent_applies_nothing_and_says_so(memorised):
    model, forget, retain = _peft(memorised)
    training = forget + retain
    tuner = model.base_model
    model.precompute_retain_statistics(training, progress=False)
    model.unlearn_request(forget[:3], training, mode="memory_aided", progress=False)
    with torch.no_grad():  # a first request that cost the retain set more than the budget
        for param in tuner.adapter_parameters("request-1"):
            param.add_(0.05 * torch.randn_like(param))
    spent = _mean_loss(model, retain)
    with tuner.muted(["request-1"]):
        assert spent > retain_budget(_mean_loss(model, retain), 1.0)
    report = model.unlearn_request(forget[3:], training, mode="memory_aided", progress=False)
    assert any("already" in w and "budget" in w for w in report.warnings)
    assert report.update_norm == 0.0 and _mean_loss(model, retain) == pytest.approx(spent, rel=1e-5)


def test_cached_statistics_down_date_to_a_fresh_computation(memorised, tmp_path):
    model, forget, retain = _peft(memorised)
    stats = model.precompute_retain_statistics(forget + retain, progress=False)
    fresh, _, _ = _peft(memorised)
    expected = fresh.precompute_retain_statistics(retain, progress=False)
    down = stats.without({fingerprint(e) for e in forget})
    assert down.fingerprints == expected.fingerprints
    for kind in ("heads", "filters"):
        assert torch.allclose(down.per_example[kind], expected.per_example[kind], rtol=1e-5, atol=1e-7)
    tensors = stats.to_tensors()
    assert set(tensors) == {"per_example.heads", "per_example.filters", "losses", "fingerprints"}
    loaded = RetainStatistics.from_tensors(tensors)
    assert loaded.fingerprints == stats.fingerprints and torch.equal(loaded.losses, stats.losses)
    with pytest.raises(ValueError, match="malformed"):
        RetainStatistics.from_tensors({**tensors, "losses": tensors["losses"][:-1]})


def test_two_request_adapters_save_reload_and_act_together(memorised, tmp_path):
    model, forget, retain = _peft(memorised)
    model.precompute_retain_statistics(forget + retain, progress=False)
    model.unlearn_request(forget[:3], forget + retain, name="erase-a", mode="memory_aided", **SO)
    model.unlearn_request(forget[3:], forget + retain, name="erase-b", mode="memory_aided", **SO)
    expected = _logits(model, forget + retain[:4])
    model.save_pretrained(tmp_path / "requests")
    files = {p.name for p in (tmp_path / "requests").iterdir()}
    # Only the files PEFT writes: records in the request adapters' configs, the cached statistics
    # in the weights file of the adapter they were computed for ("default").
    assert files == {"adapter_config.json", "adapter_model.safetensors", "README.md", "erase-a", "erase-b"}
    with safe_open(str(tmp_path / "requests" / "adapter_model.safetensors"), framework="pt") as handle:
        assert any(k.startswith("mape_retain_statistics.") for k in handle.keys())

    base_dir = tmp_path / "base"
    memorised[0].save_pretrained(base_dir)
    base = T.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    reloaded = peft_mape.load_requests(base, tmp_path / "requests")
    assert reloaded.base_model.active_adapters[-2:] == ["erase-a", "erase-b"]
    assert reloaded.request_log.names() == ["erase-a", "erase-b"]
    assert reloaded.base_model.retain_statistics is not None
    assert torch.allclose(_logits(reloaded, forget + retain[:4]), expected, atol=1e-6)


def test_request_errors_leave_no_adapter_behind(memorised):
    model, forget, retain = _peft(memorised)
    with pytest.raises(ValueError, match="precompute_retain_statistics"):
        model.unlearn_request(forget, retain, mode="memory_aided", **SO)
    with pytest.raises(ValueError, match="mode"):
        model.unlearn_request(forget, retain, mode="sometimes", **SO)
    with pytest.raises(ValueError, match="unknown unlearning method"):
        model.unlearn_request(forget, retain, method="mystery")
    assert set(model.base_model.peft_config) == {"default"}
    assert model.base_model.active_adapters == ["default"] and len(model.request_log) == 0
    model.unlearn_request(forget, retain, name="first", **SO)
    with pytest.raises(ValueError, match="already exists"):
        model.unlearn_request(forget, retain, name="first", **SO)


def test_folded_earlier_requests_give_the_same_outputs_gradients_and_request(memorised):
    """Earlier request adapters folded into one weight per layer: same logits (also with one of
    them muted), same gradients for the adapter in training, and a memory-free request whose
    deltas match the one computed through separate delta matmuls."""
    model, forget, retain = _peft(memorised)
    training = forget + retain
    model.unlearn_request(forget[:2], training, **SO)
    model.unlearn_request(forget[2:4], training, **SO)
    tuner = model.base_model
    earlier = ["default", "request-1", "request-2"]
    plain = _logits(model, forget)
    with tuner.muted(["request-1"]):
        plain_muted = _logits(model, forget)
    with tuner.folded(earlier):
        layers = [layer for _, layer in tuner.mape_layers()]
        assert any(layer._folded is not None for layer in layers)
        assert torch.allclose(_logits(model, forget), plain, atol=1e-5)  # fp32 rounding: W + d vs W, d apart
        with tuner.muted(["request-1"]):  # a muted adapter cannot stay folded: the layer falls back
            assert torch.allclose(_logits(model, forget), plain_muted, atol=1e-5)
    assert all(layer._folded is None for layer in layers)

    # A third request with and without folding: identical selections and (near-)identical deltas.
    twin, _, _ = _peft(memorised)
    twin.unlearn_request(forget[:2], training, **SO)
    twin.unlearn_request(forget[2:4], training, **SO)
    seen_folded = []

    def loss_fn(outputs, batch, tuner=tuner):
        seen_folded.append(any(layer._folded is not None for _, layer in tuner.mape_layers()))
        from peft_mape.common.data import default_per_example_loss
        return default_per_example_loss(outputs, batch)

    folded = model.unlearn_request(forget[4:], training, loss_fn=loss_fn, **SO)
    unfolded = twin.unlearn_request(forget[4:], training, fold_other_adapters=False, **SO)
    assert all(seen_folded) and seen_folded
    assert (folded.selected_heads, folded.selected_filters) == (unfolded.selected_heads, unfolded.selected_filters)
    for a, b in zip(_deltas(tuner, "request-3"), _deltas(twin.base_model, "request-3")):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_half_precision_layers_do_not_fold():
    """W + delta in bf16 would round small deltas away: such layers keep separate delta matmuls."""
    model = get_peft_model(tiny_model("llama").to(torch.bfloat16), MAPEConfig(sparsity=0.5))
    tuner = model.base_model
    tuner.apply_selection("default", {"heads": {"0": [1]}, "filters": {"0": [2]}})
    assert all(layer.fold(["default"]) == frozenset() for _, layer in tuner.mape_layers())


def test_cached_statistics_follow_a_deleted_owner_and_records_follow_their_adapter(memorised, tmp_path):
    model, forget, retain = _peft(memorised)
    model.precompute_retain_statistics(forget + retain, progress=False)
    model.unlearn_request(forget[:3], forget + retain, name="erase-a", mode="memory_aided", **SO)
    tuner = model.base_model
    assert tuner.requests.statistics_adapter == "default"
    model.delete_adapter("default")  # the adapter whose weights file stored the statistics
    assert tuner.requests.statistics_adapter == "erase-a"
    model.save_pretrained(tmp_path / "saved", selected_adapters=["erase-a"])
    base_dir = tmp_path / "base"
    memorised[0].save_pretrained(base_dir)
    base = T.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    from peft import PeftModel

    # Loaded under another name, the record is named after the adapter that holds it.
    reloaded = PeftModel.from_pretrained(base, tmp_path / "saved" / "erase-a", adapter_name="renamed")
    assert reloaded.request_log.names() == ["renamed"]
    stats = reloaded.base_model.retain_statistics
    assert stats is not None and stats.fingerprints == tuner.retain_statistics.fingerprints
    assert reloaded.base_model.requests.statistics_adapter == "renamed"
