"""Temporary model modes that every part of the library (and ``evaluation/``) uses."""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off while statistics, updates and measurements run; the previous mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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
