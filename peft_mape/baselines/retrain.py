"""Retraining, the gold standard: fine-tune the model's initialisation on the retain data only."""

from __future__ import annotations

import torch

from ..common.data import forward_arguments, make_loader, materialise, pad_token_id, validate_examples
from ..common.loop import Descent, LoopData, optimise
from ..unlearning.preparation import PhaseTimer


def retrain(model, retain, *, epochs: int = 3, lr: float = 1e-4, batch_size: int = 32, seed: int = 0,
            loss_fn=None, progress: bool = False) -> dict:
    """The gold standard: train ``model`` (the *initialisation* the original was fine-tuned from,
    e.g. the pretrained checkpoint) on the retain data only, in place.

    ``epochs`` passes of Adam descent through the library's loop, in evaluation mode (dropout
    off) with gradient clipping at 1 and the batch order of the first epoch repeated. Match the
    original training recipe when it matters (e.g. the demo retrains with its own fine-tuning
    code); this function gives every benchmark a retrain row through the same API.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    examples = materialise(retain, forward_arguments(model), what="retain")
    validate_examples(examples, "retain", needs_labels=loss_fn is None, model=model)
    loader = make_loader(examples, batch_size, pad_token_id(model), shuffle=True, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("retrain: the model has no trainable parameters (requires_grad is False everywhere)")
    timer = PhaseTimer()
    with timer.phase("update"):
        torch.manual_seed(seed)
        loop = optimise(model, params, Descent(max_steps=epochs * len(loader)), LoopData(
            forget=loader, loss_fn=loss_fn, device=next(model.parameters()).device, progress=progress), lr=lr)
    return {"method": "retrain", "num_retain": len(examples), "steps": loop.steps,
            "trainable_parameters": sum(p.numel() for p in params),
            "hyperparameters": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed},
            "seconds": timer.seconds}
