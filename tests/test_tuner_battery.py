"""A generic-tuner battery for MAPE adapters, in the spirit of PEFT's own common tuner tests
(peft's tests/testing_common.py): every check runs on tiny random-init BERT (sequence
classification), GPT-2 and Llama (causal LM) models whose adapters hold a real request.

Save/load in both formats, merge/unmerge/unload, disabling, several adapters (switching,
combining, saving, deleting), state-dict round trips, pickling, a transformers Trainer's
save/resume cycle, and saving into a folder that already holds other files.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import transformers as T
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from peft_mape import MAPEConfig, MAPELayer
from peft_mape.common.data import pad_collate

from conftest import CAUSAL, tiny_examples, tiny_model

KINDS = ("bert", "gpt2", "llama")
UNLEARN = dict(method="ga", max_steps=3, lr=5e-2, progress=False)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


# ----------------------------------------------------------------------------- helpers
def _load_base(kind, path):
    auto = T.AutoModelForCausalLM if kind in CAUSAL else T.AutoModelForSequenceClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_pretrained(path).eval()


def _inputs(kind, n=4, seed=21):
    batch = pad_collate(tiny_examples(kind, n, seed=seed, vary_length=False))
    return {k: v for k, v in batch.items() if k != "labels"}


def _logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(**x).logits


def _generate(model, kind, x):
    model.eval()
    with torch.no_grad():
        return model.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=4,
                              do_sample=False, pad_token_id=0)


def _unlearn(model, kind, forget_seed=0, retain_seed=3):
    model.unlearn(tiny_examples(kind, 3, seed=forget_seed), tiny_examples(kind, 8, seed=retain_seed), **UNLEARN)


def _base_dir(kind, tmp_path):
    base_dir = tmp_path / "base"
    if not base_dir.exists():
        tiny_model(kind).save_pretrained(base_dir)
    return base_dir


def _unlearned(kind, tmp_path, adapter_config=None, forget_seed=0):
    """A saved base model and a PeftModel on it whose ``default`` adapter holds one request."""
    base_dir = _base_dir(kind, tmp_path)
    model = get_peft_model(_load_base(kind, base_dir), adapter_config or MAPEConfig(sparsity=0.5))
    _unlearn(model, kind, forget_seed=forget_seed)
    return model, base_dir


def _add_request(model, kind, name, adapter_config=None, forget_seed=8, retain_seed=9):
    """Add adapter ``name``, make it active and unlearn other forget examples into it."""
    model.add_adapter(name, adapter_config or MAPEConfig(sparsity=0.5))
    model.set_adapter(name)
    _unlearn(model, kind, forget_seed=forget_seed, retain_seed=retain_seed)


def _wrapped_weights(model):
    """Clones of the wrapped model's own parameters and buffers (everything that is not MAPE's)."""
    state = model.get_base_model().state_dict()
    return {k: v.detach().clone() for k, v in state.items() if "mape_" not in k}


def _mape_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MAPELayer)]


def _assert_weights_equal(before, after):
    assert before.keys() == after.keys()
    differ = [k for k in before if not torch.equal(before[k], after[k])]
    assert not differ, f"base weights not bit-identical: {differ[:5]} (+{max(0, len(differ) - 5)} more)"


def _assert_active_everywhere(model, expected):
    """The model-level active adapters and every MAPELayer's agree and equal ``expected``."""
    assert list(model.base_model.active_adapters) == list(expected)
    per_layer = {name: list(layer.active_adapters) for name, layer in _mape_layers(model)}
    disagree = {name: act for name, act in per_layer.items() if act != list(expected)}
    assert not disagree, f"layers whose active adapters differ from {expected}: {disagree}"


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("kind", KINDS)
def test_save_and_reload_both_formats(kind, safe, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    expected = _logits(model, x)
    assert not torch.equal(expected, _logits(_load_base(kind, base_dir), x)), "the request changed nothing"
    out = tmp_path / "adapter"
    model.save_pretrained(out, safe_serialization=safe)
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    other = "adapter_model.bin" if safe else "adapter_model.safetensors"
    assert (out / weights).is_file() and not (out / other).exists()
    assert (out / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(_load_base(kind, base_dir), out)
    assert isinstance(reloaded.peft_config["default"], MAPEConfig)
    assert torch.equal(_logits(reloaded, x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_reload_is_frozen_unless_trainable(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable > 0
    model.save_pretrained(tmp_path / "adapter")
    frozen = PeftModel.from_pretrained(_load_base(kind, base_dir), tmp_path / "adapter")
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad]
    trainable = PeftModel.from_pretrained(_load_base(kind, base_dir), tmp_path / "adapter", is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all("mape_" in n for n in names)
    assert sum(p.numel() for p in trainable.parameters() if p.requires_grad) == n_trainable


@pytest.mark.parametrize("kind", KINDS)
def test_reload_with_low_cpu_mem_usage(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    expected = _logits(model, x)
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_load_base(kind, base_dir), tmp_path / "adapter", low_cpu_mem_usage=True)
    assert not [n for n, p in reloaded.named_parameters() if p.device.type == "meta"]
    assert torch.equal(_logits(reloaded, x), expected)


# ----------------------------------------------------------------------------- merge / unload
@pytest.mark.parametrize("kind", KINDS)
def test_merge_then_unmerge_restores_the_weights_exactly(kind, tmp_path):
    model, _ = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    expected = _logits(model, x)
    before = _wrapped_weights(model)
    model.merge_adapter()
    assert all(layer.merged for _, layer in _mape_layers(model) if "default" in layer.mape_delta)
    merged_weights = _wrapped_weights(model)
    assert any(not torch.equal(before[k], merged_weights[k]) for k in before), "merging changed no weight"
    assert torch.allclose(_logits(model, x), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    assert not any(layer.merged for _, layer in _mape_layers(model))
    _assert_weights_equal(before, _wrapped_weights(model))
    assert torch.equal(_logits(model, x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_gives_a_plain_model(kind, tmp_path):
    model, _ = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    expected = _logits(model, x)
    merged = model.merge_and_unload()
    assert not isinstance(merged, PeftModel)
    assert not [n for n, m in merged.named_modules() if isinstance(m, MAPELayer)]
    assert not [n for n in merged.state_dict() if "mape" in n]
    assert torch.allclose(_logits(merged, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_unload_gives_the_base_model_back(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    base_out = _logits(_load_base(kind, base_dir), x)
    plain = model.unload()
    assert not isinstance(plain, PeftModel)
    assert not [n for n, m in plain.named_modules() if isinstance(m, MAPELayer)]
    assert not [n for n in plain.state_dict() if "mape" in n]
    assert torch.equal(_logits(plain, x), base_out)


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge(kind, tmp_path):
    model, _ = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    expected = _logits(model, x)
    before = _wrapped_weights(model)
    model.merge_adapter(safe_merge=True)
    assert torch.allclose(_logits(model, x), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    _assert_weights_equal(before, _wrapped_weights(model))
    merged = model.merge_and_unload(safe_merge=True)
    assert torch.allclose(_logits(merged, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_safe_merge_refuses_a_broken_adapter(kind, tmp_path):
    model, _ = _unlearned(kind, tmp_path)
    layer = next(m for _, m in _mape_layers(model) if "default" in m.mape_delta)
    with torch.no_grad():
        layer.mape_delta["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan"):
        model.merge_adapter(safe_merge=True)


# ----------------------------------------------------------------------------- disable
@pytest.mark.parametrize("kind", KINDS)
def test_disable_adapter_gives_the_base_model_exactly(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    base_out = _logits(_load_base(kind, base_dir), x)
    expected = _logits(model, x)
    assert not torch.equal(expected, base_out)
    with model.disable_adapter():
        assert torch.equal(_logits(model, x), base_out)
    assert torch.equal(_logits(model, x), expected)


# ----------------------------------------------------------------------------- several adapters
def _two_requests(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    first = _logits(model, x)
    _add_request(model, kind, "second")
    second = _logits(model, x)
    return model, base_dir, x, first, second


@pytest.mark.parametrize("kind", KINDS)
def test_switch_between_adapters_and_combine_them(kind, tmp_path):
    model, base_dir, x, first, second = _two_requests(kind, tmp_path)
    base_out = _logits(_load_base(kind, base_dir), x)
    assert not torch.equal(first, second) and not torch.equal(second, base_out)
    model.set_adapter("default")
    _assert_active_everywhere(model, ["default"])
    assert torch.equal(_logits(model, x), first)
    model.set_adapter("second")
    _assert_active_everywhere(model, ["second"])
    assert torch.equal(_logits(model, x), second)
    model.base_model.set_adapter(["default", "second"])
    _assert_active_everywhere(model, ["default", "second"])
    both = _logits(model, x)
    assert not torch.equal(both, first) and not torch.equal(both, second)
    with model.disable_adapter():
        assert torch.equal(_logits(model, x), base_out)
    assert torch.equal(_logits(model, x), both)


@pytest.mark.parametrize("kind", KINDS)
def test_save_all_adapters_and_reload_both(kind, tmp_path):
    model, base_dir, x, first, second = _two_requests(kind, tmp_path)
    model.base_model.set_adapter(["default", "second"])
    both = _logits(model, x)
    out = tmp_path / "requests"
    model.save_pretrained(out)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "second" / "adapter_model.safetensors").is_file()
    assert (out / "second" / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(_load_base(kind, base_dir), out)
    assert torch.equal(_logits(reloaded, x), first)
    reloaded.load_adapter(out / "second", adapter_name="second")
    assert set(reloaded.peft_config) == {"default", "second"}
    reloaded.set_adapter("second")
    assert torch.equal(_logits(reloaded, x), second)
    reloaded.base_model.set_adapter(["default", "second"])
    assert torch.equal(_logits(reloaded, x), both)


@pytest.mark.parametrize("kind", KINDS)
def test_save_selected_adapters(kind, tmp_path):
    model, base_dir, x, first, second = _two_requests(kind, tmp_path)
    out = tmp_path / "selected"
    model.save_pretrained(out, selected_adapters=["second"])
    assert (out / "second" / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    reloaded = PeftModel.from_pretrained(_load_base(kind, base_dir), out / "second", adapter_name="second")
    assert list(reloaded.peft_config) == ["second"]
    assert torch.equal(_logits(reloaded, x), second)


# ----------------------------------------------------------------------------- delete_adapter
def _check_after_delete(model, kind, base_dir, tmp_path, deleted, remaining, expected_logits, expected_tokens, x):
    """After deleting the active adapter ``deleted``, ``remaining`` alone is active on every layer and
    the model runs forward, generates and saves exactly as that adapter alone."""
    assert deleted not in model.peft_config
    assert not [k for k in model.state_dict() if k.endswith(f".{deleted}")], "storage of the deleted adapter left"
    _assert_active_everywhere(model, [remaining])
    assert torch.equal(_logits(model, x), expected_logits)
    if kind in CAUSAL:
        assert torch.equal(_generate(model, kind, x), expected_tokens)
    out = tmp_path / "after-delete"
    model.save_pretrained(out)
    folder = out if remaining == "default" else out / remaining
    assert (folder / "adapter_config.json").is_file()
    reloaded = PeftModel.from_pretrained(_load_base(kind, base_dir), folder)
    assert torch.equal(_logits(reloaded, x), expected_logits)


def _alone(model, kind, name, x):
    model.set_adapter(name)
    return _logits(model, x), (_generate(model, kind, x) if kind in CAUSAL else None)


@pytest.mark.parametrize("kind", KINDS)
def test_delete_active_adapter_leaves_the_empty_quickstart_adapter(kind, tmp_path):
    base_dir = _base_dir(kind, tmp_path)
    model = get_peft_model(_load_base(kind, base_dir), MAPEConfig(sparsity=0.5))  # `default`: never unlearned
    x = _inputs(kind)
    base_logits, base_tokens = _alone(model, kind, "default", x)
    assert torch.equal(base_logits, _logits(_load_base(kind, base_dir), x))
    _add_request(model, kind, "request")
    assert not torch.equal(_logits(model, x), base_logits)
    model.delete_adapter("request")
    _check_after_delete(model, kind, base_dir, tmp_path, "request", "default", base_logits, base_tokens, x)


@pytest.mark.parametrize("kind", KINDS)
def test_delete_active_adapter_leaves_an_output_side_adapter(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)  # `default`: update_scope="unit"
    _add_request(model, kind, "side", MAPEConfig(sparsity=0.5, update_scope="output_side"))
    x = _inputs(kind)
    side_logits, side_tokens = _alone(model, kind, "side", x)
    model.set_adapter("default")
    assert not torch.equal(_logits(model, x), side_logits)
    model.delete_adapter("default")
    _check_after_delete(model, kind, base_dir, tmp_path, "default", "side", side_logits, side_tokens, x)


@pytest.mark.parametrize("kind", KINDS)
def test_delete_active_adapter_among_three_with_different_selections(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)  # `default`: heads and filters
    _add_request(model, kind, "req-heads", MAPEConfig(sparsity=0.5, units="heads"), forget_seed=8)
    _add_request(model, kind, "req-filters", MAPEConfig(sparsity=0.5, units="filters"), forget_seed=11)
    selections = [model.peft_config[n].selection for n in ("default", "req-heads", "req-filters")]
    assert all(selections) and len({repr(s) for s in selections}) == 3
    x = _inputs(kind)
    alone = {name: _alone(model, kind, name, x) for name in ("req-heads", "req-filters")}
    model.set_adapter("default")
    model.delete_adapter("default")
    active = list(model.base_model.active_adapters)
    assert len(active) == 1 and active[0] in alone, f"active adapters after deleting the active one: {active}"
    logits, tokens = alone[active[0]]
    _check_after_delete(model, kind, base_dir, tmp_path, "default", active[0], logits, tokens, x)


@pytest.mark.parametrize("kind", KINDS)
def test_delete_an_inactive_adapter(kind, tmp_path):
    model, base_dir, x, first, second = _two_requests(kind, tmp_path)
    model.set_adapter("default")
    model.delete_adapter("second")
    assert list(model.peft_config) == ["default"]
    _assert_active_everywhere(model, ["default"])
    assert torch.equal(_logits(model, x), first)


# ----------------------------------------------------------------------------- state dicts
@pytest.mark.parametrize("kind", KINDS)
def test_peft_state_dict_round_trip(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    expected = _logits(model, x)
    sd = get_peft_model_state_dict(model)
    assert sd and all("mape_" in k for k in sd)
    other = get_peft_model(_load_base(kind, base_dir), copy.deepcopy(model.peft_config["default"]))
    assert not torch.equal(_logits(other, x), expected)  # same shapes, zero deltas
    result = set_peft_model_state_dict(other, sd)
    assert not result.unexpected_keys, result.unexpected_keys
    assert not [k for k in result.missing_keys if "mape_" in k], result.missing_keys
    assert torch.equal(_logits(other, x), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_state_dict_round_trip_of_a_named_adapter(kind, tmp_path):
    model, base_dir, x, first, second = _two_requests(kind, tmp_path)
    sd = get_peft_model_state_dict(model, adapter_name="second")
    assert sd and all("mape_" in k for k in sd)
    other = get_peft_model(_load_base(kind, base_dir), copy.deepcopy(model.peft_config["default"]))
    other.add_adapter("second", copy.deepcopy(model.peft_config["second"]))
    result = set_peft_model_state_dict(other, sd, adapter_name="second")
    assert not result.unexpected_keys, result.unexpected_keys
    other.set_adapter("second")
    assert torch.equal(_logits(other, x), second)


@pytest.mark.parametrize("kind", KINDS)
def test_full_state_dict_round_trip(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    expected = _logits(model, x)
    other = get_peft_model(_load_base(kind, base_dir), copy.deepcopy(model.peft_config["default"]))
    other.load_state_dict(model.state_dict())
    assert torch.equal(_logits(other, x), expected)


# ----------------------------------------------------------------------------- pickling
def _torch_round_trip(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["pickle", "torch_save", "deepcopy"])
@pytest.mark.parametrize("kind", KINDS)
def test_pickle_round_trip(kind, how, tmp_path):
    model, _ = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    expected = _logits(model, x)
    copy_of = {"pickle": lambda m: pickle.loads(pickle.dumps(m)), "torch_save": _torch_round_trip,
               "deepcopy": copy.deepcopy}[how](model)
    assert isinstance(copy_of, PeftModel) and isinstance(copy_of.peft_config["default"], MAPEConfig)
    assert torch.equal(_logits(copy_of, x), expected)
    with copy_of.disable_adapter():
        assert not torch.equal(_logits(copy_of, x), expected)


# ----------------------------------------------------------------------------- HF Trainer
class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _trainer(model, kind, out, max_steps):
    args = T.TrainingArguments(output_dir=str(out), max_steps=max_steps, save_steps=2, per_device_train_batch_size=2,
                               learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1,
                               dataloader_num_workers=0, disable_tqdm=True)
    return T.Trainer(model=model, args=args, train_dataset=_Rows(tiny_examples(kind, 6, seed=5)),
                     data_collator=pad_collate)


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_save_and_resume(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    before = _logits(model, x)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("mape_" in n for n in trainable)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(model, kind, out, max_steps=4)
        trainer.train()
        trainer.save_model()
    checkpoints = sorted(p.name for p in out.glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"], sorted(p.name for p in out.iterdir())
    for name in checkpoints:
        assert (out / name / "adapter_model.safetensors").is_file(), sorted(os.listdir(out / name))
        assert (out / name / "trainer_state.json").is_file(), sorted(os.listdir(out / name))
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    trained = _logits(model, x)
    assert not torch.equal(trained, before), "training changed nothing"
    reloaded = PeftModel.from_pretrained(_load_base(kind, base_dir), out)
    assert torch.equal(_logits(reloaded, x), trained)

    resumed_model = PeftModel.from_pretrained(_load_base(kind, base_dir), out / "checkpoint-4", is_trainable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = _trainer(resumed_model, kind, out, max_steps=6)
        resumed.train(resume_from_checkpoint=True)
        resumed.save_model()
    assert resumed.state.global_step == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    final = _logits(resumed_model, x)
    assert not torch.equal(final, trained)
    reloaded = PeftModel.from_pretrained(_load_base(kind, base_dir), out)
    assert torch.equal(_logits(reloaded, x), final)


# ----------------------------------------------------------------------------- saving keeps the folder
CARD_TEXT = "Custom model card text: erasure request 42, keep this paragraph."


def _save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(10)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(folder)
    return fast


def _snapshot(root: Path):
    """Every entry under ``root`` (hidden ones too): bytes and mtime of files, mtime of folders."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        out[str(p.relative_to(root))] = (p.read_bytes(), st.st_mtime_ns) if p.is_file() else ("<dir>", st.st_mtime_ns)
    return out


def _populated_folder(kind, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    tokenizer = _save_tokenizer(folder)
    (folder / "README.md").write_text(f"# My unlearned model\n\n{CARD_TEXT}\n")
    (folder / "other.txt").write_text("notes that are not an adapter's\n")
    older, _ = _unlearned(kind, tmp_path / "older", forget_seed=13)
    older.save_pretrained(folder / "older-request")
    return folder, tokenizer


@pytest.mark.parametrize("kind", KINDS)
def test_save_keeps_what_is_in_the_folder(kind, tmp_path):
    model, base_dir = _unlearned(kind, tmp_path)
    x = _inputs(kind)
    folder, tokenizer = _populated_folder(kind, tmp_path)
    before = _snapshot(folder)
    assert any(name.startswith("tokenizer") for name in before)
    model.save_pretrained(folder)
    after = _snapshot(folder)
    missing = sorted(set(before) - set(after))
    assert not missing, f"save_pretrained removed {missing}"
    changed = sorted(k for k in before if k != "README.md" and before[k][0] != after[k][0])
    assert not changed, f"save_pretrained changed {changed}"
    added = sorted(set(after) - set(before))
    assert added == ["adapter_config.json", "adapter_model.safetensors"], added
    assert CARD_TEXT in (folder / "README.md").read_text()
    assert T.PreTrainedTokenizerFast.from_pretrained(folder)("w1 w3 w5")["input_ids"] == \
        tokenizer("w1 w3 w5")["input_ids"]
    assert torch.equal(_logits(PeftModel.from_pretrained(_load_base(kind, base_dir), folder), x), _logits(model, x))
    older = PeftModel.from_pretrained(_load_base(kind, base_dir), folder / "older-request")
    assert not torch.equal(_logits(older, x), _logits(model, x))


@pytest.mark.parametrize("kind", KINDS)
def test_save_on_a_non_main_process_writes_nothing(kind, tmp_path):
    model, _ = _unlearned(kind, tmp_path)
    folder, _ = _populated_folder(kind, tmp_path)
    model.save_pretrained(folder)
    # A different adapter state, so that any file written would differ from the one saved above.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)
    before = _snapshot(folder)
    model.save_pretrained(folder, is_main_process=False)
    after = _snapshot(folder)
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    assert not added and not removed, f"is_main_process=False added {added}, removed {removed}"
    changed = sorted(k for k in before if before[k] != after[k])
    assert not changed, f"is_main_process=False changed {changed}"
    fresh = tmp_path / "not-created"
    model.save_pretrained(fresh, is_main_process=False)
    assert not fresh.exists() or not any(fresh.iterdir())
