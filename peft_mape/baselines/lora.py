"""*LoRA-restricted* GA / GradDiff: a fresh ``peft.LoraConfig`` adapter on the same projections
MAPE wraps, trained with the unlearning loss."""

from __future__ import annotations

from typing import Optional

import torch

from ..common.loop import optimise
from ..common.stopping import target_mean
from ..tuner.architectures import resolve_architecture
from .shared import baseline_setup, forget_and_retain_losses, loop_hyperparameters

LORA_METHODS = ("ga", "graddiff")


def default_lora_config(model, r: int = 8):
    """LoRA (rank ``r``, alpha 2r, no dropout) on every projection MAPE wraps, for a like-for-like pool."""
    from peft import LoraConfig

    targets = sorted(resolve_architecture(model, None).roles())
    modules = dict(model.named_modules())
    # transformers' Conv1D (GPT-2) stores weights [in, out]; LoRA must know.
    conv1d = any(type(modules[name]).__name__ == "Conv1D" for name in targets)
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=conv1d)


def lora_unlearn(model, forget, retain=None, *, method: str = "ga", lora_config=None, holdout=None,
                 forget_loss_target: Optional[float] = None, **options):
    """LoRA-restricted unlearning: train a fresh LoRA adapter with the GA (or GradDiff) loss.

    Returns ``(peft_model, report)``. ``options`` as for :func:`salun_unlearn`. ``model`` (a plain
    transformers model) is wrapped in place by ``peft.get_peft_model``;
    ``peft_model.disable_adapter()`` gives the original outputs back, ``peft_model.unload()`` the
    original modules. On failure the LoRA layers are unloaded again.
    """
    from peft import get_peft_model

    update_loss, data, target = baseline_setup(model, forget, retain, method, LORA_METHODS, holdout,
                                                forget_loss_target, options)
    forget_before, retain_before = forget_and_retain_losses(model, data)
    seconds, seed = data.timer.seconds, data.options.seed

    config = lora_config or default_lora_config(model)
    torch.manual_seed(seed)  # LoRA A is randomly initialised
    peft_model = get_peft_model(model, config)
    try:
        with data.timer.phase("update"):
            params = [p for p in peft_model.parameters() if p.requires_grad]
            loop = optimise(peft_model, params, update_loss, data.loop_data(), lr=update_loss.step_size(False),
                            target=target)
    except BaseException:
        peft_model.unload()
        raise
    forget_after, retain_after = forget_and_retain_losses(peft_model, data)
    return peft_model, {
        "method": f"lora-{method}", "num_forget": len(data.forget_examples), "num_retain": len(data.retain_examples),
        "trainable_parameters": sum(p.numel() for p in params), "lora_rank": config.r,
        "forget_loss_before": forget_before, "forget_loss_after": forget_after,
        "retain_loss_before": retain_before, "retain_loss_after": retain_after,
        "steps": loop.steps, "stopped_early": loop.stopped_early, "forget_loss_target": target_mean(target),
        "stopping": loop.stopping(target), "warnings": loop.warnings,
        "hyperparameters": loop_hyperparameters(update_loss, data), "seconds": seconds,
    }
