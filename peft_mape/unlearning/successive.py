"""Successive erasure requests (SPEC §4): one named adapter per request, and a log of them.

Two modes:

- ``"memory_free"``: each request searches and updates at the *current* model (all earlier
  request adapters active); nothing is cached between requests.
- ``"memory_aided"``: each request is computed from the *original* weights (earlier request
  adapters inactive while it runs), with the retain-side mask statistics computed once by
  :func:`precompute_retain_statistics` and down-dated by every example removed so far. Deltas
  of requests add when their adapters are active together.

Either way the finished request stays active alongside the earlier ones, the retain set of
later requests leaves out every removed example, and the :class:`RequestLog` records what each
request did (hashes of the removed examples, never their contents). ``save_pretrained`` writes
the :class:`RequestState` (``requests.json`` and ``retain_statistics.safetensors``) next to the
adapters; :func:`load_requests` restores them.
"""

from __future__ import annotations

import copy
import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..common.data import fingerprint, set_fingerprint
from ..common.files import atomic_write
from .report import UnlearnReport
from .statistics import RetainStatistics, mask_gradients
from .phases import request_scope
from .preparation import RunOptions, prepare
from .unlearn import prepare_request, resolve_run, unlearn_prepared

MODES = ("memory_free", "memory_aided")
LOG_FILE = "requests.json"
STATISTICS_FILE = "retain_statistics.safetensors"


@dataclass
class RequestRecord:
    """What one erasure request did."""

    name: str
    mode: str
    method: str
    num_forget: int
    forget_set_hash: str  # hash of the sorted example hashes: identifies the set, reveals nothing
    removed_example_hashes: list[str]
    num_selected_heads: int
    num_selected_filters: int
    trainable_parameters: int
    forget_loss_before: float
    forget_loss_after: float
    seconds: float
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())


@dataclass
class RequestLog:
    """The ordered erasure requests held by a model."""

    records: list[RequestRecord] = field(default_factory=list)

    def names(self) -> list[str]:
        return [r.name for r in self.records]

    def removed(self) -> set[str]:
        """Hashes of every example removed by any request so far."""
        return {h for r in self.records for h in r.removed_example_hashes}

    def __len__(self) -> int:
        return len(self.records)

    def to_dict(self) -> dict:
        return {"requests": [asdict(r) for r in self.records]}

    def save(self, path) -> None:
        text = json.dumps(self.to_dict(), indent=2)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    @classmethod
    def load(cls, path) -> "RequestLog":
        payload = json.loads(Path(path).read_text())
        return cls([RequestRecord(**r) for r in payload["requests"]])


class RequestState:
    """What successive requests keep between calls: the :class:`RequestLog` and the retain-side
    mask statistics cached at the original weights (memory-aided mode). One per tuner
    (``MAPEModel.requests``); saved beside the adapters and loaded back with them."""

    def __init__(self, log: Optional[RequestLog] = None, retain_statistics: Optional[RetainStatistics] = None):
        self.log = log if log is not None else RequestLog()
        self.retain_statistics = retain_statistics

    def save(self, directory) -> None:
        """Write ``requests.json`` (when a request was logged) and the cached statistics into ``directory``."""
        if self.log:
            self.log.save(Path(directory) / LOG_FILE)
        if self.retain_statistics is not None:
            self.retain_statistics.save(Path(directory) / STATISTICS_FILE)

    @classmethod
    def load(cls, directory) -> "RequestState":
        directory = Path(directory)
        log = RequestLog.load(directory / LOG_FILE) if (directory / LOG_FILE).exists() else RequestLog()
        statistics = RetainStatistics.load(directory / STATISTICS_FILE) if (directory / STATISTICS_FILE).exists() \
            else None
        return cls(log, statistics)

    def drop_record(self, adapter_name: str) -> None:
        """Drop the record of a deleted request adapter."""
        self.log.records = [r for r in self.log.records if r.name != adapter_name]


def precompute_retain_statistics(tuner, retain, *, loss_fn=None, batch_size: int = 16, seed: int = 0,
                                 adapter_name: Optional[str] = None, progress: bool = True) -> RetainStatistics:
    """Retain-side mask statistics at the original weights (every MAPE adapter muted), cached on the model.

    The sample is the one ``unlearn()`` would draw (``max_retain_examples``, ``seed``). Later
    memory-aided requests reuse it, dropping the rows of removed examples.
    """
    name = adapter_name or tuner.active_adapters[0]
    options = RunOptions(seed=seed, batch_size=batch_size, loss_fn=loss_fn, progress=progress)
    data = prepare(tuner.model, None, retain, options=options,
                   max_retain_examples=tuner.peft_config[name].max_retain_examples)
    if not data.retain_examples:
        raise ValueError("the retain set is empty: there is nothing to precompute statistics on")
    with tuner.muted(tuner.peft_config.keys()):
        grads = mask_gradients(tuner, data.retain_loader, loss_fn, device=data.device,
                               desc="retain statistics (cached)", progress=progress)
    stats = RetainStatistics(grads.per_example, grads.losses, [fingerprint(e) for e in data.retain_examples])
    tuner.requests.retain_statistics = stats
    return stats


def unlearn_request(tuner, forget, retain=None, *, name: Optional[str] = None, mode: str = "memory_free",
                    config=None, **unlearn_options) -> UnlearnReport:
    """Run one erasure request into a new adapter ``name`` (default ``request-<k>``) and log it.

    ``config`` defaults to a copy of the active adapter's config without its selection;
    ``unlearn_options`` are :func:`peft_mape.unlearning.unlearn`'s (``method``, ``holdout``,
    ``forget_loss_target``, ``selection``, the method's options and the run options).
    """
    if mode not in MODES:
        raise ValueError(f"unknown request mode {mode!r}; choose one of {list(MODES)}")
    state = tuner.requests
    if mode == "memory_aided" and state.retain_statistics is None:
        raise ValueError("memory-aided requests need cached retain statistics: call "
                         "model.precompute_retain_statistics(retain) once before the first request")
    method = unlearn_options.pop("method", None)
    holdout = unlearn_options.pop("holdout", None)
    target = unlearn_options.pop("forget_loss_target", None)
    selection = unlearn_options.pop("selection", None)
    run, chosen = resolve_run(method, unlearn_options)
    name = name or f"request-{len(state.log) + 1}"
    if name in tuner.peft_config:
        raise ValueError(f"an adapter named '{name}' already exists; pass another name=")
    active_before = list(tuner.active_adapters)
    config = copy.deepcopy(config if config is not None else tuner.peft_config[active_before[-1]])
    config.selection = None
    config.base_fingerprint = None
    config.weights_digest = None
    config.inference_mode = False
    tuner.peft_config[name] = config
    tuner.inject_adapter(tuner.model, name)
    # Memory-free requests see the current model (earlier requests active); memory-aided ones
    # the original weights (only the new, still empty, adapter active).
    earlier = [a for a in active_before if a != name]
    tuner.set_adapter(earlier + [name] if mode == "memory_free" else [name])
    for other in earlier:  # only the new request's deltas receive gradients
        for param in tuner.adapter_parameters(other):
            param.requires_grad_(False)
    removed = state.log.removed()
    statistics = state.retain_statistics.without(removed) if mode == "memory_aided" else None
    overrides = {"sparsity": run.sparsity, "units": run.units, "objective": run.objective}
    try:
        with request_scope(tuner, name, overrides, run.fold_other_adapters):
            data, target = prepare_request(tuner, name, forget, retain, run, chosen, holdout=holdout, target=target,
                                           exclude=removed)
            report = unlearn_prepared(tuner, name, chosen, data, target=target, selection=selection,
                                      retain_statistics=statistics)
    except BaseException:
        tuner.set_adapter(active_before)
        tuner.delete_adapter(name)
        raise
    tuner.set_adapter(earlier + [name])
    hashes = sorted(fingerprint(e) for e in data.forget_examples)
    state.log.records.append(RequestRecord(
        name=name, mode=mode, method=report.method, num_forget=report.num_forget,
        forget_set_hash=set_fingerprint(hashes), removed_example_hashes=hashes,
        num_selected_heads=report.num_selected_heads, num_selected_filters=report.num_selected_filters,
        trainable_parameters=report.trainable_parameters, forget_loss_before=report.forget_loss_before,
        forget_loss_after=report.forget_loss_after, seconds=sum(report.seconds.values()),
    ))
    return report


def load_requests(model, directory, *, is_trainable: bool = False):
    """Load every request adapter listed in ``directory``'s log, activate them together, and
    restore the log and the cached retain statistics.

    ``model`` is a PeftModel loaded from ``directory`` or a base model (then loaded here).
    """
    from peft import PeftModel

    directory = Path(directory)
    if not isinstance(model, PeftModel):
        model = PeftModel.from_pretrained(model, directory, is_trainable=is_trainable)
    tuner = model.base_model
    state = RequestState.load(directory)
    log = state.log
    for record in log.records:
        if record.name not in tuner.peft_config:
            model.load_adapter(directory / record.name, adapter_name=record.name, is_trainable=is_trainable)
    tuner.requests = state
    if log.records:
        active = [a for a in tuner.active_adapters if a not in log.names()] + log.names()
        tuner.set_adapter(active, inference_mode=not is_trainable)
    return model
