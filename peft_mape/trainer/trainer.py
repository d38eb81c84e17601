"""``UnlearningTrainer``: the update phase of ``unlearn()`` as a ``transformers.Trainer``.

The library runs the phases that need no training loop when the trainer is made (prepare,
statistics, mask search, allocating the selected deltas), so the Trainer's optimizer, its
distributed wrappers (DDP sees every delta from the start) and its checkpoints cover exactly the
selected units. The Trainer then owns the loop: devices and processes, gradient accumulation,
mixed precision, learning-rate schedules, logging, checkpoints, ``save_model``. Its
``compute_loss`` is the chosen loop method's objective over one forget batch and one retain batch
(:class:`~.data.PairedExamples`), dropout off as in ``unlearn()``.

What stays with ``unlearn()``: the retain-loss trust region (it rolls weights back and changes the
step size, which is the Trainer's optimizer's and scheduler's business) and the closed-form
methods. With a ``holdout`` the trainer still stops when the forget set looks unseen
(:class:`TargetStopping`) and caps the per-example push at the holdout's level.
"""

from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
from transformers import Trainer, TrainerCallback

from ..common.loop import LoopMethod
from ..common.step_losses import batch_losses
from ..common.modes import eval_mode
from ..common.stopping import HoldoutTarget, check_target, target_mean, target_summary
from ..unlearning.phases import (
    Measurements, UpdateOutcome, adapter_to_fill, apply_selection, build_report, fixed_selection, mask_search,
    mask_statistics, measure, request_scope,
)
from ..unlearning.report import UnlearnReport
from ..unlearning.unlearn import prepare_request, resolve_run
from .data import PairedCollator, PairedExamples


TRAINER_KEYWORDS = frozenset(inspect.signature(Trainer.__init__).parameters) - {"self", "model", "args"}


class TargetStopping(TrainerCallback):
    """Every ``eval_every`` optimizer steps, check whether the forget set looks unseen (the
    holdout's membership AUC, or a mean forget loss) and stop the training when it does. With
    several processes every rank checks its share of the forget set and all get the same answer,
    so they stop together."""

    def __init__(self, trainer: "UnlearningTrainer", target, eval_every: int):
        self.trainer, self.target, self.eval_every = trainer, target, eval_every
        self.checks: list[dict] = []
        self.stop_reason = ""

    def check(self, step: int) -> bool:
        data = self.trainer.unlearning_data
        model = self.trainer.model
        record = check_target(model, data.forget_eval_loader, self.target, loss_fn=data.loss_fn,
                              device=next(model.parameters()).device, step=step)
        self.checks.append({k: v for k, v in record.items() if k not in ("reached", "mismatched")})
        return record["reached"]

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.eval_every == 0 and self.check(state.global_step):
            self.stop_reason = f"target reached at step {state.global_step}"
            control.should_training_stop = True
        return control


class UnlearningTrainer(Trainer):
    """A ``transformers.Trainer`` that erases ``forget`` into ``model``'s (empty, active) MAPE adapter.

    Args:
        model: a ``PeftModel`` with a MAPE adapter (``get_peft_model(base, MAPEConfig(...))``).
        args: ``TrainingArguments``; set ``learning_rate`` (``unlearn()``'s default on selected
            units is 2e-4, 1e-5 with ``selection="all"``) and ``max_steps`` (or epochs: one epoch
            is one pass over the larger of the two sets). ``remove_unused_columns`` is turned off:
            the batches are pairs of model-ready batches.
        forget, retain, holdout, forget_loss_target, selection, adapter_name: as for
            ``model.unlearn()``.
        method: a loop method ("graddiff" default, "ga", "npo", or an instance); its ``lr``,
            ``max_steps`` and step-control options are the Trainer's business and ignored here;
            ``eval_every`` sets how often the stopping target is checked, ``per_example_cap``
            and ``kl_weight`` act as in ``unlearn()``.
        **options: keywords of ``Trainer`` (``callbacks``, ``optimizers``, ``eval_dataset``, ...)
            go to it, except ``train_dataset`` and ``data_collator``, which this trainer builds;
            the rest are the method's options and ``unlearn()``'s run options (``seed``,
            ``batch_size`` of the statistics pass, ``loss_fn``, ``progress``, ``sparsity`` ...).
    """

    def __init__(self, model, args=None, *, forget, retain=None, method=None, holdout=None,
                 forget_loss_target: Optional[float] = None, selection=None, adapter_name: Optional[str] = None,
                 **options):
        for owned in ("train_dataset", "data_collator"):
            if owned in options:
                raise ValueError(f"UnlearningTrainer builds its own {owned} from forget/retain; do not pass {owned}")
        trainer_options = {k: options.pop(k) for k in list(options) if k in TRAINER_KEYWORDS}
        callbacks = trainer_options.pop("callbacks", None)
        tuner = getattr(model, "base_model", None)
        if not hasattr(tuner, "adapter_parameters") or not hasattr(tuner, "peft_config"):
            raise ValueError(f"model must be a PeftModel with a MAPE adapter (get_peft_model(base, MAPEConfig())), "
                             f"got {type(model).__name__}")
        run, chosen = resolve_run(method, options)
        if not isinstance(chosen, LoopMethod):
            raise ValueError(f"UnlearningTrainer trains loop methods (graddiff, ga, npo); '{chosen.name}' is a "
                             "closed-form step with no training loop: use model.unlearn(method=...)")
        name = adapter_to_fill(tuner, adapter_name)
        overrides = {"sparsity": run.sparsity, "units": run.units, "objective": run.objective}
        with request_scope(tuner, name, overrides, fold_other_adapters=False):
            data, target = prepare_request(tuner, name, forget, retain, run, chosen, holdout=holdout,
                                           target=forget_loss_target)
            if chosen.needs_retain and not data.retain_examples:
                raise ValueError(f"method '{chosen.name}' needs a non-empty retain set")
            if selection is None:
                statistics = mask_statistics(tuner, data, tuner.peft_config[name].objective)
                self.selection_result = mask_search(tuner, name, data, statistics)
                before = (statistics.forget_loss, statistics.retain_loss)
            else:
                self.selection_result = fixed_selection(tuner, name, selection, seed=run.seed)
                before = (None, None)
            apply_selection(tuner, name, self.selection_result, data)
        self.tuner, self.adapter_name, self.method, self.unlearning_data = tuner, name, chosen, data
        self.target = target
        self.forget_cap = None if target is None else (target.level if isinstance(target, HoldoutTarget)
                                                       else float(target))
        with data.timer.phase("evaluation"):
            forget_before = before[0] if before[0] is not None else data.mean_loss(data.forget_eval_loader)
            retain_before = before[1]
            if retain_before is None and data.report_loader is not None:
                retain_before = data.mean_loss(data.report_loader)
        self.losses_before = (forget_before, retain_before)
        self.stopping = TargetStopping(self, target, chosen.eval_every) if target is not None else None
        try:
            super().__init__(model=model, args=args,
                             train_dataset=PairedExamples(data.forget_examples,
                                                          data.retain_examples if chosen.needs_retain else None),
                             data_collator=PairedCollator(data.pad_token_id),
                             callbacks=list(callbacks or []) + ([self.stopping] if self.stopping else []),
                             **trainer_options)
        except BaseException:
            tuner.apply_selection(name, None)  # the model as it was
            raise
        self.args.remove_unused_columns = False  # also when the Trainer made the arguments itself
        # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps.
        self.model_accepts_loss_kwargs = False

    def training_step(self, model, inputs, *args, **kwargs):
        # Dropout off for the forward *and* the backward, where gradient checkpointing recomputes
        # the forward: the Trainer's own model.train() at the start of the step is held back.
        model.train = lambda mode=True: model  # an instance attribute, shadowing the method for the step
        try:
            with eval_mode(model):
                return super().training_step(model, inputs, *args, **kwargs)
        finally:
            del model.train

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        with eval_mode(model):
            losses = batch_losses(model, self.method, inputs["forget"], inputs.get("retain"),
                                  loss_fn=self.unlearning_data.loss_fn, full_forward=True,
                                  reference=lambda: self.tuner.muted([self.adapter_name]))
        losses.forget_cap = self.forget_cap
        objective = self.method.objective(losses)
        if not torch.isfinite(objective):
            raise FloatingPointError(f"non-finite {self.method.name} objective at step {self.state.global_step}")
        return (objective, None) if return_outputs else objective

    def report(self) -> UnlearnReport:
        """The :class:`UnlearnReport` of what training did so far (losses measured now)."""
        data = self.unlearning_data
        forget_after, retain_after = measure(data)
        stopping = dict(target_summary(self.target), stop_reason=(self.stopping.stop_reason if self.stopping else "")
                        or f"the Trainer's step budget ({self.state.global_step} steps)")
        if self.stopping:
            stopping["checks"] = self.stopping.checks
        outcome = UpdateOutcome(steps=self.state.global_step, stopped_early=bool(self.stopping and self.stopping.stop_reason),
                                lr=self.args.learning_rate, diagnostics={"stopping": stopping, "trainer": True})
        losses = Measurements(self.losses_before[0], forget_after, self.losses_before[1], retain_after,
                              target_mean(self.target))
        report = build_report(self.tuner, self.adapter_name, self.method, data, result=self.selection_result,
                              outcome=outcome, losses=losses)
        if not math.isfinite(report.forget_loss_after):
            report.warnings.append("the forget loss is not finite after training")
        return report
