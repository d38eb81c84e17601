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
request did (hashes of the removed examples, never their contents). That state travels in the
files PEFT already writes, so plain ``save_pretrained`` keeps it: each request's record is the
``request_record`` field of its adapter's config, and the cached retain statistics are tensors in
the weights file of the adapter they were computed for. :func:`load_requests` loads every
request adapter found in a saved folder.
"""

from __future__ import annotations

import copy
import datetime
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from ..common.data import fingerprint, set_fingerprint
from ..common.files import read_json
from ..common.stopping import retain_budget
from .report import UnlearnReport
from .statistics import RetainStatistics, mask_gradients
from .phases import request_scope
from .preparation import RunOptions, prepare
from .unlearn import prepare_request, resolve_run, unlearn_prepared

MODES = ("memory_free", "memory_aided")


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

    @classmethod
    def from_configs(cls, peft_config: Mapping) -> "RequestLog":
        """The records held by the request adapters in ``peft_config``, oldest first; each is named
        after the adapter that holds it."""
        records = [RequestRecord(**{**c.request_record, "name": name}) for name, c in peft_config.items()
                   if getattr(c, "request_record", None)]
        return cls(sorted(records, key=lambda r: (r.created, r.name)))


class RequestState:
    """The retain-side mask statistics cached at the original weights (memory-aided mode), and
    the adapter whose weights file stores them. One per tuner (``MAPEModel.requests``); the
    request log itself lives in the adapters' configs (:meth:`RequestLog.from_configs`)."""

    def __init__(self, retain_statistics: Optional[RetainStatistics] = None, statistics_adapter: Optional[str] = None):
        self.retain_statistics = retain_statistics
        self.statistics_adapter = statistics_adapter


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
    tuner.requests.retain_statistics, tuner.requests.statistics_adapter = stats, name
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
    log = RequestLog.from_configs(tuner.peft_config)
    if mode == "memory_aided" and state.retain_statistics is None:
        raise ValueError("memory-aided requests need cached retain statistics: call "
                         "model.precompute_retain_statistics(retain) once before the first request")
    method = unlearn_options.pop("method", None)
    holdout = unlearn_options.pop("holdout", None)
    target = unlearn_options.pop("forget_loss_target", None)
    selection = unlearn_options.pop("selection", None)
    run, chosen = resolve_run(method, unlearn_options)
    name = name or f"request-{len(log) + 1}"
    if name in tuner.peft_config:
        raise ValueError(f"an adapter named '{name}' already exists; pass another name=")
    active_before = list(tuner.active_adapters)
    config = copy.deepcopy(config if config is not None else tuner.peft_config[active_before[-1]])
    config.selection = None
    config.base_fingerprint = None
    config.weights_digest = None
    config.request_record = None
    config.inference_mode = False
    tuner.peft_config[name] = config
    tuner.inject_adapter(tuner.model, name)
    # Memory-free requests see the current model (earlier requests active); memory-aided ones
    # compute at the original weights (earlier requests muted), but their deltas add: their trust
    # region measures the retain loss with the earlier deltas applied, against one budget relative
    # to the original model's retain loss that all requests share. Checked alone, each delta spent
    # the whole budget again (10 tweet requests compounded to -34 test points); with a fresh budget
    # relative to the model before each request, to -15.
    earlier = [a for a in active_before if a != name]
    tuner.set_adapter(earlier + [name])
    for other in earlier:  # only the new request's deltas receive gradients
        for param in tuner.adapter_parameters(other):
            param.requires_grad_(False)
    removed = log.removed()
    aided = mode == "memory_aided"
    statistics = state.retain_statistics.without(removed) if aided else None
    overrides = {"sparsity": run.sparsity, "units": run.units, "objective": run.objective}
    try:
        with request_scope(tuner, name, overrides, run.fold_other_adapters), \
                (tuner.muted(earlier) if aided else nullcontext()):
            data, target = prepare_request(tuner, name, forget, retain, run, chosen, holdout=holdout, target=target,
                                           exclude=removed)
            if aided and data.report_loader is not None:
                _share_retain_budget(tuner, data, earlier, chosen)
            report = unlearn_prepared(tuner, name, chosen, data, target=target, selection=selection,
                                      retain_statistics=statistics)
    except BaseException:
        tuner.set_adapter(active_before)
        tuner.delete_adapter(name)
        raise
    hashes = sorted(fingerprint(e) for e in data.forget_examples)
    config.request_record = asdict(RequestRecord(
        name=name, mode=mode, method=report.method, num_forget=report.num_forget,
        forget_set_hash=set_fingerprint(hashes), removed_example_hashes=hashes,
        num_selected_heads=report.num_selected_heads, num_selected_filters=report.num_selected_filters,
        trainable_parameters=report.trainable_parameters, forget_loss_before=report.forget_loss_before,
        forget_loss_after=report.forget_loss_after, seconds=sum(report.seconds.values()),
    ))
    return report


def _share_retain_budget(tuner, data, earlier: list[str], method) -> None:
    """Point a memory-aided request's trust region at the model with every delta applied and at
    the original model's retain loss (see :func:`unlearn_request`); warn when the earlier requests
    already spent that budget (the request can then accept no step)."""
    data.retain_reference = data.mean_loss(data.report_loader)  # earlier requests muted: the original
    data.retain_view = lambda: tuner.unmuted(earlier)
    tolerance = getattr(method, "retain_tolerance", None)
    if tolerance is None or not earlier:
        return
    with data.retain_view():
        combined = data.mean_loss(data.report_loader)
    budget = retain_budget(data.retain_reference, tolerance)
    if combined > budget:
        data.report_warnings.append(
            f"the earlier memory-aided requests together already raised the retain loss to {combined:.4f}, beyond "
            f"the budget they share ({budget:.4f}: retain_tolerance={tolerance:g} of the original model's "
            f"{data.retain_reference:.4f}); this request can accept no step. Raise retain_tolerance, or run it "
            "memory-free (its budget is relative to the current model)")


def load_requests(model, directory, *, is_trainable: bool = False):
    """Load every request adapter saved in ``directory`` (the sub-folders whose MAPE config holds
    a request record), oldest first, and activate them together after the other active adapters.

    ``model`` is a PeftModel loaded from ``directory`` or a base model (then loaded here). The
    cached retain statistics come back with the adapter whose weights file holds them.
    """
    from peft import PeftModel

    directory = Path(directory)
    if not isinstance(model, PeftModel):
        model = PeftModel.from_pretrained(model, directory, is_trainable=is_trainable)
    tuner = model.base_model
    saved = []
    for folder in sorted(p for p in directory.iterdir() if (p / "adapter_config.json").is_file()):
        payload = read_json(folder / "adapter_config.json", f"{folder} has no adapter_config.json")
        record = payload.get("request_record") if payload.get("peft_type") == "MAPE" else None
        if isinstance(record, dict):
            saved.append((str(record.get("created", "")), folder.name))
    for _, name in sorted(saved):
        if name not in tuner.peft_config:
            model.load_adapter(directory / name, adapter_name=name, is_trainable=is_trainable)
    names = RequestLog.from_configs(tuner.peft_config).names()
    if names:
        active = [a for a in tuner.active_adapters if a not in names] + names
        tuner.set_adapter(active, inference_mode=not is_trainable)
    return model
