"""``MAPEModel``: the PEFT ``BaseTuner`` that injects MAPE layers and runs ``unlearn()``."""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .architectures import Architecture, owned_indices, resolve_architecture
from .layer import MAPELayer
from .registration import MAPE_PREFIX


class MAPEModel(BaseTuner):
    """Wraps every Q/K/V/O and FFN projection of a Transformer in a :class:`MAPELayer`.

    A fresh adapter holds no delta (the model is unchanged); ``unlearn()`` searches the unit
    selection, allocates deltas over the owned parameters and updates them. The selection is
    recorded in the adapter's config, so loading rebuilds the delta shapes before the
    state dict is read.
    """

    prefix: str = MAPE_PREFIX
    tuner_layer_cls = MAPELayer
    target_module_mapping: dict = {}
    retain_statistics = None  # set by precompute_retain_statistics()

    def architecture(self, adapter_name: str | None = None) -> Architecture:
        """The resolved unit structure, using the adapter config's overrides."""
        config = self.peft_config[adapter_name or self.active_adapters[0]]
        return resolve_architecture(self.model, config)

    def _prepare_adapter_config(self, peft_config, model_config):
        # The targets are derived from the model itself (not only its model_type), so that
        # architecture overrides in the config and nested wrappers are handled in one place.
        arch = resolve_architecture(self.model, peft_config)
        peft_config.target_modules = arch.target_regex()
        self._pending_architecture = arch
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        arch = getattr(self, "_pending_architecture", None) or resolve_architecture(self.model, peft_config)
        role, gated_units = arch.roles()[current_key]
        index = owned_indices(arch, peft_config.selection or {}, peft_config.update_scope).get(current_key)
        if isinstance(target, MAPELayer):
            target.update_layer(adapter_name, index)
            return
        new_module = MAPELayer(target, role=role, gated_units=gated_units)
        new_module.update_layer(adapter_name, index)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def mape_layers(self) -> Iterator[tuple[str, MAPELayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, MAPELayer):
                yield name, module

    def apply_selection(self, adapter_name: str, selection: dict | None) -> None:
        """Record ``selection`` in the adapter config and (re)allocate zero deltas for it."""
        config = self.peft_config[adapter_name]
        config.selection = selection
        index = owned_indices(self.architecture(adapter_name), selection or {}, config.update_scope)
        for name, layer in self.mape_layers():
            layer.update_layer(adapter_name, index.get(name))
            for param in layer.adapter_parameters(adapter_name):
                param.requires_grad_(adapter_name in self.active_adapters)

    @contextlib.contextmanager
    def muted(self, adapter_names: Iterable[str]):
        """Compute outputs as if ``adapter_names`` were inactive (NPO/KL reference: no weight copy)."""
        names = frozenset(adapter_names)
        layers = [layer for _, layer in self.mape_layers()]
        previous = [layer.muted_adapters for layer in layers]
        for layer in layers:
            layer.muted_adapters = layer.muted_adapters | names
        try:
            yield
        finally:
            for layer, before in zip(layers, previous):
                layer.muted_adapters = before

    @contextlib.contextmanager
    def folded(self, adapter_names: Iterable[str]):
        """Apply ``adapter_names`` through one precomputed weight per layer while the context
        lasts (their deltas must not change meanwhile); see :meth:`MAPELayer.fold`."""
        names = list(adapter_names)
        layers = [layer for _, layer in self.mape_layers()]
        try:
            for layer in layers:
                layer.fold(names)
            yield
        finally:
            for layer in layers:
                layer.unfold()

    def adapter_parameters(self, adapter_name: str) -> list[nn.Parameter]:
        return [p for _, layer in self.mape_layers() for p in layer.adapter_parameters(adapter_name)]

    def unlearn(self, forget, retain=None, method: str | None = None, **kwargs):
        """Erase the influence of ``forget`` into the active adapter; see :func:`peft_mape.unlearn.unlearn`."""
        from .unlearn import unlearn

        return unlearn(self, forget, retain=retain, method=method, **kwargs)

    def unlearn_request(self, forget, retain=None, **kwargs):
        """One of successive requests, into its own new adapter; see :func:`peft_mape.requests.unlearn_request`."""
        from .requests import unlearn_request

        return unlearn_request(self, forget, retain, **kwargs)

    def precompute_retain_statistics(self, retain, **kwargs):
        """Cache retain statistics at the original weights; see :func:`peft_mape.requests.precompute_retain_statistics`."""
        from .requests import precompute_retain_statistics

        return precompute_retain_statistics(self, retain, **kwargs)

    @property
    def request_log(self):
        """The :class:`peft_mape.requests.RequestLog` of this model's erasure requests."""
        from .requests import request_log

        return request_log(self)
