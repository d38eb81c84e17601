"""UnlearningTrainer: the library's statistics and search, then the method's loss in a Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import TrainingArguments

import peft_mape
from peft_mape import MAPEConfig, UnlearningTrainer
from conftest import memorised_model, tiny_examples


def _arguments(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                  report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True)
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.fixture(scope="module")
def memorised():
    return memorised_model("bert", epochs=40, lr=3e-3)


def _deltas(model, adapter="default"):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f"mape_delta.{adapter}" in n}


def test_trains_the_selected_units_saves_and_reloads(memorised, tmp_path, one_thread):
    base, forget, retain = memorised
    model = get_peft_model(copy.deepcopy(base), MAPEConfig(sparsity=0.9))
    alone = get_peft_model(copy.deepcopy(base), MAPEConfig(sparsity=0.9))
    expected = alone.unlearn(forget, retain, max_steps=1, progress=False)
    trainer = UnlearningTrainer(model, _arguments(tmp_path, gradient_accumulation_steps=2), forget=forget,
                                retain=retain, progress=False)
    # the same phases as unlearn(): the same selection, allocated before the Trainer's optimizer exists
    assert model.peft_config["default"].selection == alone.peft_config["default"].selection
    assert (expected.selected_heads, expected.selected_filters) == (trainer.selection_result.selection().get("heads", {}),
                                                                    trainer.selection_result.selection().get("filters", {}))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("mape_" in n for n in trainable)
    trainer.train()
    report = trainer.report()
    assert trainer.state.global_step == 6 and report.steps == 6
    assert report.forget_loss_after > report.forget_loss_before
    assert any(float(v.abs().max()) > 0 for v in _deltas(model).values())

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "adapter"))
    batch = {k: v.unsqueeze(0) for k, v in forget[0].items()}
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, model.eval()(**batch).logits, atol=1e-6)


def test_stops_when_the_forget_set_looks_unseen(memorised, tmp_path, one_thread):
    base, forget, retain = memorised
    model = get_peft_model(copy.deepcopy(base), MAPEConfig(sparsity=0.9))
    holdout = tiny_examples("bert", 30, seed=9)
    trainer = UnlearningTrainer(model, _arguments(tmp_path, max_steps=300, learning_rate=1e-2, logging_steps=50), forget=forget,
                                retain=retain, holdout=holdout, progress=False)
    trainer.train()
    report = trainer.report()
    stopping = report.diagnostics["stopping"]
    assert trainer.state.global_step < 300 and report.stopped_early
    assert stopping["stop_reason"].startswith("target reached")
    assert stopping["checks"][-1]["auc"] <= 0.52 and "membership AUC" in stopping["criterion"]


def test_npo_with_its_reference_and_no_retain_term(memorised, tmp_path, one_thread):
    base, forget, _ = memorised
    model = get_peft_model(copy.deepcopy(base), MAPEConfig(sparsity=0.9))
    trainer = UnlearningTrainer(model, _arguments(tmp_path, max_steps=3), forget=forget, method="npo",
                                retain_weight=0.0, objective="norm", progress=False)
    assert len(trainer.train_dataset) == len(forget) and "retain" not in trainer.train_dataset[0]
    trainer.train()
    assert trainer.report().forget_loss_after > trainer.losses_before[0]


def test_bad_calls_fail_before_any_work_and_leave_the_model_as_it_was(memorised, tmp_path, monkeypatch):
    base, forget, retain = memorised
    model = get_peft_model(copy.deepcopy(base), MAPEConfig(sparsity=0.9))
    with pytest.raises(ValueError, match="closed-form"):
        UnlearningTrainer(model, _arguments(tmp_path), forget=forget, retain=retain, method="influence")
    with pytest.raises(ValueError, match="train_dataset"):
        UnlearningTrainer(model, _arguments(tmp_path), forget=forget, retain=retain, train_dataset=forget)
    with pytest.raises(ValueError, match="MAPE adapter"):
        UnlearningTrainer(copy.deepcopy(base), _arguments(tmp_path), forget=forget, retain=retain)
    with pytest.raises(ValueError, match="lr_typo"):
        UnlearningTrainer(model, _arguments(tmp_path), forget=forget, retain=retain, lr_typo=1.0)
    assert not model.peft_config["default"].selection and not _deltas(model)

    def failing_init(self, *args, **kwargs):
        raise RuntimeError("the Trainer failed")

    monkeypatch.setattr("transformers.Trainer.__init__", failing_init)
    with pytest.raises(RuntimeError, match="the Trainer failed"):  # after the search: the selection is dropped
        UnlearningTrainer(model, _arguments(tmp_path), forget=forget, retain=retain, progress=False)
    assert not model.peft_config["default"].selection and not _deltas(model)
    assert peft_mape.UnlearningTrainer is UnlearningTrainer


def test_gradient_checkpointing_and_default_arguments(tmp_path, one_thread, monkeypatch):
    """The backward's recomputation runs with dropout off like the forward; with args=None the
    Trainer's own arguments still keep the paired batches."""
    base, forget, retain = memorised_model("gpt2", epochs=10, lr=1e-2)  # GPT-2 has dropout to recompute
    base.config.resid_pdrop = base.config.attn_pdrop = base.config.embd_pdrop = 0.5
    for module in base.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    base.gradient_checkpointing_enable()
    model = get_peft_model(base, MAPEConfig(sparsity=0.9))
    trainer = UnlearningTrainer(model, _arguments(tmp_path, max_steps=3, gradient_checkpointing=True), forget=forget,
                                retain=retain, progress=False)
    trainer.train()
    assert trainer.state.global_step == 3 and "train" not in vars(model)
    monkeypatch.chdir(tmp_path)
    other = get_peft_model(memorised_model("gpt2", epochs=1, lr=1e-2)[0], MAPEConfig(sparsity=0.9))
    trainer = UnlearningTrainer(other, forget=forget, retain=retain, progress=False)
    assert trainer.args.remove_unused_columns is False
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"forget", "retain"}
