"""Temporary model modes that every part of the library (and ``evaluation/``) uses."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off while statistics, updates and measurements run; the previous mode is restored.

    Layers with gradient checkpointing switched on (``model.gradient_checkpointing_enable()``)
    keep their own training flag, which is what transformers checks before checkpointing, while
    everything inside them (dropout, attention dropout) is in eval mode: the update recomputes
    activations instead of keeping them, and still sees a deterministic function."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True and isinstance(module, torch.nn.Module):
            module.training = True  # this flag only, not the submodules'
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def gradients_only_for(model: torch.nn.Module, params: Iterable[torch.nn.Parameter]):
    """``requires_grad`` only on ``params`` while the context lasts; every flag is restored after."""
    chosen = {id(p) for p in params}
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    try:
        for p in all_params:
            p.requires_grad_(id(p) in chosen)
        yield
    finally:
        for p, flag in zip(all_params, flags):
            p.requires_grad_(flag)
