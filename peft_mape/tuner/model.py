"""``MAPEModel``: the PEFT ``BaseTuner`` that injects MAPE layers and runs ``unlearn()``."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .architectures import Architecture, owned_indices, resolve_architecture
from .integrity import base_weights_fingerprint, check_base_weights, tensors_digest
from .layer import MAPELayer
from .registration import MAPE_PREFIX


STATISTICS_PREFIX = "mape_retain_statistics."  # keys of the cached retain statistics in a weights file


def _tuner_of(model):
    """The tuner inside a PeftModel (PEFT's hooks receive either)."""
    from peft import PeftModel

    return model.base_model if isinstance(model, PeftModel) else model


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

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from ..unlearning.successive import RequestState

        self.requests = RequestState()  # successive requests: the cached retain statistics

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

    def inject_adapter(self, model, adapter_name, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        # A loaded adapter records the base weights it was computed on: check them now, before
        # its deltas are used on another model (see :func:`peft_mape.tuner.integrity.check_base_weights`).
        config = self.peft_config.get(adapter_name)
        if config is not None and config.selection and config.base_fingerprint:
            try:
                check_base_weights(self, adapter_name, config.base_model_check)
            except BaseException:
                self._discard_adapter_storage(adapter_name)  # PEFT drops the config of a failed add
                raise

    def _discard_adapter_storage(self, adapter_name: str) -> None:
        for _, layer in self.mape_layers():
            layer.remove_adapter_storage(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name``; the same remaining adapter(s) become active on every layer.

        PEFT lets each layer pick a new active adapter among the ones it stores, but a MAPE layer
        stores nothing for an adapter that does not touch it (an empty adapter, ``update_scope=
        "output_side"``, another request's selection): the choice is made here, once, for all.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter '{adapter_name}' does not exist; known: {sorted(self.peft_config)}")
        was_active = adapter_name in self.active_adapters
        still_active = [a for a in self.active_adapters if a != adapter_name]
        remaining = [a for a in self.peft_config if a != adapter_name]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            super().delete_adapter(adapter_name)
        new_active = still_active or remaining[:1]
        if was_active and not still_active and new_active:
            warnings.warn(f"adapter '{adapter_name}' was active and is now deleted; active adapter: '{new_active[0]}'",
                          UserWarning, stacklevel=2)
        if new_active:
            self.set_adapter(new_active)
        else:
            self.active_adapter = []
        if self.requests.statistics_adapter == adapter_name:  # the statistics stay; another file stores them
            self.requests.statistics_adapter = new_active[0] if new_active else None

    def add_weighted_adapter(self, *args, **kwargs):
        raise NotImplementedError(
            "add_weighted_adapter is not supported for MAPE adapters: each request's deltas live on its own "
            "selection of units. Activate several requests together instead (their deltas add): "
            "model.base_model.set_adapter(['request-1', 'request-2']), then merge_and_unload() if one model is needed"
        )

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's adapter state dict, plus the cached retain statistics of successive requests
        when ``adapter_name`` is the adapter that stores them: so ``save_pretrained`` keeps them
        in a file it writes anyway, with nothing in PEFT replaced."""
        tensors = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        requests = getattr(_tuner_of(model), "requests", None)
        if requests is not None and requests.retain_statistics is not None \
                and requests.statistics_adapter == adapter_name:
            tensors.update({STATISTICS_PREFIX + k: v for k, v in requests.retain_statistics.to_tensors().items()})
        return tensors

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Check a loaded adapter state dict against the adapter config before PEFT loads it.

        PEFT loads non-strictly, so a missing delta would stay zero and a saved index would
        silently replace the one the config's selection gives: both are errors here, as are
        tensors of the wrong shape or dtype, non-finite deltas, and weights whose digest differs
        from the one recorded in ``adapter_config.json`` when the adapter was saved.
        """
        try:
            remapped, statistics = cls._checked_state_dict(model, config, adapter_name, state_dict)
        except ValueError:
            # A failed load leaves the adapter's zero deltas behind: drop them (and the adapter,
            # when another one remains) so the model is as it was before the load.
            tuner = getattr(model, "base_model", None)
            if not isinstance(tuner, MAPEModel):
                raise
            if len(tuner.peft_config) > 1 and adapter_name in tuner.peft_config:
                tuner.delete_adapter(adapter_name)
            else:
                tuner._discard_adapter_storage(adapter_name)
            raise
        tuner = _tuner_of(model)
        if statistics is not None and isinstance(tuner, MAPEModel):
            tuner.requests.retain_statistics, tuner.requests.statistics_adapter = statistics, adapter_name
        return remapped

    @classmethod
    def _checked_state_dict(cls, model, config, adapter_name, state_dict):
        if config.weights_digest is not None:
            digest = tensors_digest(state_dict)
            recorded, config.weights_digest = config.weights_digest, None  # the digest describes that file only
            if digest != recorded:
                raise ValueError(
                    f"adapter '{adapter_name}': the weights file does not match adapter_config.json (weights digest "
                    f"{digest[:12]}..., recorded {str(recorded)[:12]}...): the file is corrupt or from another save"
                )
        stored = {k[len(STATISTICS_PREFIX):]: v for k, v in state_dict.items() if k.startswith(STATISTICS_PREFIX)}
        statistics = None
        if stored:
            from ..unlearning.statistics import RetainStatistics

            try:
                statistics = RetainStatistics.from_tensors(stored)
            except ValueError as error:
                raise ValueError(f"adapter '{adapter_name}': {error}") from None
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(STATISTICS_PREFIX)}
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        expected = {k: v for k, v in model.state_dict().items()
                    if k.endswith(f".{adapter_name}") and f".{MAPE_PREFIX}" in k}
        loaded = {k: v for k, v in remapped.items() if f".{MAPE_PREFIX}" in k}
        missing = sorted(set(expected) - set(loaded))
        unexpected = sorted(set(loaded) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"adapter '{adapter_name}': the saved tensors do not match the config's selection "
                f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''})"
            )
        for key, value in loaded.items():
            want = expected[key]
            if value.shape != want.shape:
                raise ValueError(f"adapter '{adapter_name}': {key} has shape {tuple(value.shape)}, the config's "
                                 f"selection gives {tuple(want.shape)}")
            if ".mape_index." in key:
                if value.dtype.is_floating_point or not torch.equal(value.to(want.device, want.dtype), want):
                    raise ValueError(
                        f"adapter '{adapter_name}': the saved indices of {key.rsplit('.mape_index', 1)[0]} differ from "
                        f"the ones the config's selection gives: adapter_config.json and the weights disagree"
                    )
            elif not value.dtype.is_floating_point or not torch.isfinite(value).all():
                raise ValueError(f"adapter '{adapter_name}': {key} is not a finite floating-point tensor "
                                 f"(dtype {value.dtype})")
        return remapped, statistics

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
        # The deltas are computed for these base weights; loading checks them (see inject_adapter).
        config.base_fingerprint = base_weights_fingerprint(self, adapter_name) if selection else None

    def muted(self, adapter_names: Iterable[str]):
        """Compute outputs as if ``adapter_names`` were inactive (NPO/KL reference: no weight copy)."""
        names = frozenset(adapter_names)
        return self._muting(lambda muted: muted | names)

    def unmuted(self, adapter_names: Iterable[str]):
        """Undo :meth:`muted` for ``adapter_names`` while the context lasts (a memory-aided request
        checks the retain loss with the earlier requests' deltas applied)."""
        names = frozenset(adapter_names)
        return self._muting(lambda muted: muted - names)

    @contextlib.contextmanager
    def _muting(self, change):
        layers = [layer for _, layer in self.mape_layers()]
        previous = [layer.muted_adapters for layer in layers]
        for layer in layers:
            layer.muted_adapters = change(layer.muted_adapters)
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

    def unlearn(self, forget, retain=None, method=None, *, holdout=None, forget_loss_target=None, selection=None,
                adapter_name=None, **options):
        from ..unlearning.unlearn import unlearn

        return unlearn(self, forget, retain, method, holdout=holdout, forget_loss_target=forget_loss_target,
                       selection=selection, adapter_name=adapter_name, **options)

    def select_units(self, forget, retain=None, **options):
        """The units ``unlearn()`` would update, without changing anything; see :func:`peft_mape.unlearning.unlearn.select_units`."""
        from ..unlearning.unlearn import select_units

        return select_units(self, forget, retain, **options)

    def unlearn_request(self, forget, retain=None, **kwargs):
        """One of successive requests, into its own new adapter; see :func:`peft_mape.unlearning.successive.unlearn_request`."""
        from ..unlearning.successive import unlearn_request

        return unlearn_request(self, forget, retain, **kwargs)

    def precompute_retain_statistics(self, retain, **kwargs):
        """Cache retain statistics at the original weights; see :func:`peft_mape.unlearning.successive.precompute_retain_statistics`."""
        from ..unlearning.successive import precompute_retain_statistics

        return precompute_retain_statistics(self, retain, **kwargs)

    @property
    def request_log(self):
        """The :class:`peft_mape.unlearning.successive.RequestLog` of this model's erasure requests
        (the records held by the request adapters' configs)."""
        from ..unlearning.successive import RequestLog

        return RequestLog.from_configs(self.peft_config)

    @property
    def retain_statistics(self):
        """Retain statistics cached by :meth:`precompute_retain_statistics` (memory-aided requests)."""
        return self.requests.retain_statistics

def _unlearn_doc() -> str:
    from ..unlearning.unlearn import unlearn

    return unlearn.__doc__


MAPEModel.unlearn.__doc__ = _unlearn_doc()
