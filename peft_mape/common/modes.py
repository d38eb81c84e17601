"""Temporary model modes that every part of the library (and ``evaluation/``) uses."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Iterable

import torch


@functools.lru_cache(maxsize=None)
def _flag_only_gates_checkpointing(cls: type) -> bool:
    """Whether ``cls.forward`` reads ``self.training`` for nothing but checkpointing, i.e. its
    own code (not its submodules') never mentions ``self.training``: then turning the flag on
    checkpoints the layer without turning on dropout. Layers that call dropout themselves
    (OPT, BART, Whisper ...) or drop layers (LayerDrop) do not qualify."""
    forward = inspect.unwrap(cls.forward)
    try:
        return "self.training" not in inspect.getsource(forward)
    except (OSError, TypeError):
        return False


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off while statistics, updates and measurements run; every module's previous mode
    is restored.

    Layers with gradient checkpointing switched on (``model.gradient_checkpointing_enable()``)
    keep their own training flag, which is what transformers checks before checkpointing, while
    everything inside them (dropout, attention dropout) is in eval mode: the update recomputes
    activations instead of keeping them, and still sees a deterministic function. Where a
    layer's own code reads the flag for more than that, it stays in eval mode and is not
    checkpointed."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    checkpointed = [module for module in model.modules()
                    if getattr(module, "gradient_checkpointing", False) is True
                    and _flag_only_gates_checkpointing(type(module))]
    for module in checkpointed:
        module.training = True  # this flag only, not the submodules'
    # A model left in eval mode would build a key/value cache that the recomputation writes a
    # second time: no cache while layers are checkpointed (generate() passes its own use_cache).
    configs = {id(c): c for m in (model.modules() if checkpointed else ())
               if hasattr(c := getattr(m, "config", None), "use_cache")}
    caching = {key: config.use_cache for key, config in configs.items()}
    for config in configs.values():
        config.use_cache = False
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for key, config in configs.items():
            config.use_cache = caching[key]


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
