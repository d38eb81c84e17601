"""A user's files and model are never lost: safe merges, checks on load, clear errors on bad input."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import transformers as T
from peft import PeftConfig, PeftModel, get_peft_model

from peft_mape import MAPEConfig
from peft_mape.tuner.integrity import BaseModelMismatch

from conftest import CAUSAL, tiny_examples, tiny_model
from test_persistence import _inputs, _load_base, _unlearned


def _mape_layer_with_bias(model):
    return next(layer for _, layer in model.base_model.mape_layers()
                if "default" in layer.mape_bias and layer.get_base_layer().bias is not None)


def _base_state(model):
    return {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "mape_" not in k}


@pytest.mark.parametrize("broken", ["weight", "bias"])
def test_safe_merge_refuses_non_finite_deltas_and_leaves_the_base_layer_unchanged(broken, tmp_path):
    model, _ = _unlearned("bert", tmp_path)
    layer = _mape_layer_with_bias(model)
    store = layer.mape_delta if broken == "weight" else layer.mape_bias
    with torch.no_grad():
        store["default"].view(-1)[0] = float("nan")
    before = _base_state(model)
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    after = _base_state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "safe_merge changed the base weights"
    assert not layer.merged


def test_safe_merge_of_finite_deltas_equals_the_unmerged_model(tmp_path):
    model, _ = _unlearned("bert", tmp_path)
    x = _inputs("bert")
    expected = model(**x).logits
    model.merge_adapter(safe_merge=True)
    assert torch.allclose(model(**x).logits, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_loading_onto_a_reseeded_base_warns_and_can_be_an_error(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the right base: no warning at all
        warnings.filterwarnings("ignore", message="(?!.*other base weights)")
        PeftModel.from_pretrained(_load_base(kind, base_dir), tmp_path / "adapter")

    other = tiny_model(kind, seed=7)  # same architecture and shapes, other weights
    with pytest.warns(UserWarning, match="other base weights"):
        PeftModel.from_pretrained(other, tmp_path / "adapter")

    strict = PeftConfig.from_pretrained(tmp_path / "adapter")
    strict.base_model_check = "error"
    with pytest.raises(BaseModelMismatch, match="other base weights"):
        PeftModel.from_pretrained(tiny_model(kind, seed=7), tmp_path / "adapter", config=strict)


def test_a_base_loaded_in_another_dtype_is_compared_within_its_rounding(tmp_path):
    model, base_dir = _unlearned("llama", tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="(?!.*other base weights)")
        base = T.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    with pytest.warns(UserWarning, match="other base weights"):
        PeftModel.from_pretrained(tiny_model("llama", seed=7).to(torch.bfloat16), tmp_path / "adapter")


def test_a_state_dict_of_another_selection_with_the_same_sizes_is_refused(tmp_path):
    model, base_dir = _unlearned("bert", tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    heads = saved["selection"]["heads"]
    layer = next(k for k, v in heads.items() if v)
    heads[layer] = sorted((h + 1) % 4 for h in heads[layer])  # same number of heads, other ones
    saved["weights_digest"] = None
    config_path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="saved indices .* differ from the ones the config's selection gives"):
        PeftModel.from_pretrained(_load_base("bert", base_dir), tmp_path / "adapter")


def test_a_failed_load_adapter_leaves_the_model_as_it_was(tmp_path):
    model, base_dir = _unlearned("bert", tmp_path)
    model.save_pretrained(tmp_path / "adapter")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "adapter", broken)
    data = bytearray((broken / "adapter_model.safetensors").read_bytes())
    data[-3] ^= 0x5A
    (broken / "adapter_model.safetensors").write_bytes(bytes(data))

    loaded = PeftModel.from_pretrained(_load_base("bert", base_dir), tmp_path / "adapter")
    x = _inputs("bert")
    expected = loaded(**x).logits
    with pytest.raises(ValueError, match="weights file does not match adapter_config.json"):
        loaded.load_adapter(broken, adapter_name="broken")
    assert list(loaded.peft_config) == ["default"]
    assert all("broken" not in layer.mape_delta for _, layer in loaded.base_model.mape_layers())
    assert torch.equal(loaded(**x).logits, expected)


@pytest.mark.parametrize("selection, message", [
    ({"heads": {"5": [0]}}, r"layer 5 out of range 0..1"),
    ({"heads": {"0": [4]}}, r"index out of range 0..3"),
    ({"filters": {"1": [-1]}}, r"index out of range 0..23"),
    ({"heads": {"0": ["a"]}}, r"heads index of layer 0 must be an integer"),
    ({"heads": {"0": 3}}, r"must be a list of indices"),
    ({"units": {}}, r"keys 'heads' and/or 'filters'"),
])
def test_bad_selections_name_the_layer_and_the_index(selection, message):
    model = get_peft_model(tiny_model("bert"), MAPEConfig())
    forget, retain = tiny_examples("bert", 3), tiny_examples("bert", 6, seed=3)
    with pytest.raises(ValueError, match=message):
        model.unlearn(forget, retain, selection=selection, method="ga", max_steps=1, progress=False)
    assert model.peft_config["default"].selection is None


@pytest.mark.parametrize("kind, field, value, message", [
    ("bert", "labels", 3, r"forget example 1: labels value 3 is outside the classifier's labels .*0..2"),
    ("vit", "labels", -1, r"forget example 1: labels value -1 is outside the classifier's labels"),
    ("bert", "input_ids", 40, r"forget example 1: input_ids value 40 is outside the vocabulary .*0..39"),
    ("gpt2", "input_ids", -2, r"forget example 1: input_ids value -2 is outside the vocabulary"),
    ("llama", "labels", 99, r"forget example 1: labels value 99 is outside the vocabulary .* or -100"),
])
def test_out_of_range_labels_and_token_ids_are_clear_errors_before_any_work(kind, field, value, message):
    model = get_peft_model(tiny_model(kind), MAPEConfig())
    forget = tiny_examples(kind, 3)
    retain = tiny_examples(kind, 6, seed=3)
    bad = forget[1][field].clone()
    bad.view(-1)[0] = value
    forget[1][field] = bad
    x = {k: v for k, v in tiny_examples(kind, 1, seed=9)[0].items() if k != "labels"}
    x = {k: v.unsqueeze(0) for k, v in x.items()}
    expected = model(**x).logits
    with pytest.raises(ValueError, match=message):
        model.unlearn(forget, retain, method="ga", max_steps=1, progress=False)
    assert model.peft_config["default"].selection is None
    assert torch.equal(model(**x).logits, expected)


def test_token_labels_may_be_ignored_with_minus_100():
    model = get_peft_model(tiny_model("gpt2"), MAPEConfig(sparsity=0.5))
    forget = tiny_examples("gpt2", 3)
    forget[0]["labels"][:2] = -100
    report = model.unlearn(forget, tiny_examples("gpt2", 6, seed=3), method="ga", max_steps=1, progress=False)
    assert report.num_forget == 3


def test_add_weighted_adapter_says_it_is_not_supported_and_what_to_do():
    model = get_peft_model(tiny_model("bert"), MAPEConfig())
    with pytest.raises(NotImplementedError, match=r"not supported for MAPE.*set_adapter"):
        model.add_weighted_adapter(["default"], [1.0], "combined")


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_deleting_a_request_drops_it_from_the_request_log(kind):
    model = get_peft_model(tiny_model(kind), MAPEConfig(sparsity=0.5))
    retain = tiny_examples(kind, 8, seed=3)
    model.unlearn_request(tiny_examples(kind, 2), retain, method="ga", max_steps=1, lr=1e-2, progress=False)
    model.unlearn_request(tiny_examples(kind, 2, seed=4), retain, method="ga", max_steps=1, lr=1e-2,
                          progress=False)
    model.delete_adapter("request-2")
    assert model.base_model.request_log.names() == ["request-1"]
    assert model.base_model.active_adapters == ["default", "request-1"]
    assert kind in CAUSAL or model(**_inputs(kind)).logits.shape[-1] == 3
