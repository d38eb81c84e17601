"""What the baselines share: data prepared exactly as ``unlearn()`` prepares it, the loop method
of a baseline's name, and the report's losses and hyperparameters."""

from __future__ import annotations

from typing import Optional

from ..common.stopping import mean_loss
from ..unlearning.methods import LoopMethod
from ..unlearning.preparation import UnlearningData, holdout_target, prepare
from ..unlearning.unlearn import resolve_run


def baseline_setup(model, forget, retain, method: str, choices, holdout, forget_loss_target, options: dict):
    """The loop method, the data (prepared exactly as ``unlearn()`` prepares it) and the stopping target."""
    if method not in choices:
        raise ValueError(f"unknown method {method!r} for this baseline; choose one of {list(choices)}")
    options = {"progress": False, **options}
    run, loop_method = resolve_run(method, options, method)
    data = prepare(model, forget, retain, options=run)
    if loop_method.needs_retain and data.train_loader is None:
        raise ValueError(f"method '{method}' needs a non-empty retain set")
    target = forget_loss_target
    if target is None and holdout is not None:
        target = holdout_target(data, holdout)
    return loop_method, data, target


def loop_hyperparameters(method: LoopMethod, data: UnlearningData) -> dict:
    return {"seed": data.options.seed, "batch_size": data.batch_size, **method.options(),
            "lr": method.step_size(False)}


def forget_and_retain_losses(model, data: UnlearningData) -> tuple[float, Optional[float]]:
    """Mean forget loss and mean loss of the report's retain prefix (timed as "evaluation")."""
    with data.timer.phase("evaluation"):
        return _losses(model, data)


def _losses(model, data: UnlearningData) -> tuple[float, Optional[float]]:
    forget = mean_loss(model, data.forget_eval_loader, data.loss_fn, device=data.device)
    retain = mean_loss(model, data.report_loader, data.loss_fn, device=data.device) \
        if data.report_loader is not None else None
    return forget, retain


def model_device(model, device):
    return device if device is not None else next(model.parameters()).device
