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
the log (``requests.json``) and cached statistics (``retain_statistics.safetensors``) next to
the adapters; :func:`load_requests` restores them.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


from .data import fingerprint, make_loader
from .report import UnlearnReport
from .saving import atomic_write
from .statistics import RetainStatistics, mask_gradients

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


def request_log(tuner) -> RequestLog:
    """The tuner's request log (created empty on first use)."""
    if getattr(tuner, "_mape_request_log", None) is None:
        tuner._mape_request_log = RequestLog()
    return tuner._mape_request_log


def precompute_retain_statistics(tuner, retain, *, loss_fn=None, batch_size: int = 16, seed: int = 0,
                                 adapter_name: Optional[str] = None, progress: bool = True) -> RetainStatistics:
    """Retain-side mask statistics at the original weights (every MAPE adapter muted), cached on the model.

    The sample is the one ``unlearn()`` would draw (``max_retain_examples``, ``seed``). Later
    memory-aided requests reuse it, dropping the rows of removed examples.
    """
    from .unlearn import prepare_examples

    name = adapter_name or tuner.active_adapters[0]
    config = tuner.peft_config[name]
    _, examples = prepare_examples(tuner, config, None, retain, loss_fn=loss_fn, seed=seed)
    if not examples:
        raise ValueError("the retain set is empty: there is nothing to precompute statistics on")
    pad = getattr(getattr(tuner.model, "config", None), "pad_token_id", None) or 0
    device = next(tuner.model.parameters()).device
    with tuner.muted(tuner.peft_config.keys()):
        grads = mask_gradients(tuner, make_loader(examples, batch_size, pad), loss_fn, device=device,
                               desc="retain statistics (cached)", progress=progress)
    stats = RetainStatistics(grads.per_example, grads.losses, [fingerprint(e) for e in examples])
    tuner.retain_statistics = stats
    return stats


def unlearn_request(tuner, forget, retain=None, *, name: Optional[str] = None, mode: str = "memory_free",
                    config=None, **unlearn_kwargs) -> UnlearnReport:
    """Run one erasure request into a new adapter ``name`` (default ``request-<k>``) and log it.

    ``config`` defaults to a copy of the active adapter's config without its selection;
    ``unlearn_kwargs`` go to :func:`peft_mape.unlearn.unlearn`.
    """
    from .unlearn import unlearn

    if mode not in MODES:
        raise ValueError(f"unknown request mode {mode!r}; choose one of {list(MODES)}")
    statistics = getattr(tuner, "retain_statistics", None)
    if mode == "memory_aided" and statistics is None:
        raise ValueError("memory-aided requests need cached retain statistics: call "
                         "model.precompute_retain_statistics(retain) once before the first request")
    log = request_log(tuner)
    name = name or f"request-{len(log) + 1}"
    if name in tuner.peft_config:
        raise ValueError(f"an adapter named '{name}' already exists; pass another name=")
    active_before = list(tuner.active_adapters)
    template = tuner.peft_config[active_before[-1]]
    config = copy.deepcopy(config if config is not None else template)
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
    kwargs = dict(unlearn_kwargs)
    kwargs.setdefault("exclude_from_retain", log.removed())
    if mode == "memory_aided":
        kwargs.setdefault("retain_statistics", statistics)
    try:
        report = unlearn(tuner, forget, retain, adapter_name=name, **kwargs)
    except BaseException:
        tuner.set_adapter(active_before)
        tuner.delete_adapter(name)
        raise
    tuner.set_adapter(earlier + [name])
    hashes = _forget_hashes(tuner, forget, config, kwargs.get("loss_fn"))
    log.records.append(RequestRecord(
        name=name, mode=mode, method=report.method, num_forget=report.num_forget,
        forget_set_hash=hashlib.sha256("".join(sorted(hashes)).encode()).hexdigest(),
        removed_example_hashes=sorted(hashes), num_selected_heads=report.num_selected_heads,
        num_selected_filters=report.num_selected_filters, trainable_parameters=report.trainable_parameters,
        forget_loss_before=report.forget_loss_before, forget_loss_after=report.forget_loss_after,
        seconds=sum(report.seconds.values()),
    ))
    return report


def _forget_hashes(tuner, forget, config, loss_fn) -> list[str]:
    from .unlearn import prepare_examples

    examples, _ = prepare_examples(tuner, config, forget, None, loss_fn=loss_fn)
    return [fingerprint(e) for e in examples]


def save_request_state(tuner, directory) -> None:
    """Write the request log and cached retain statistics (if any) into ``directory``."""
    log = getattr(tuner, "_mape_request_log", None)
    if log:
        log.save(Path(directory) / LOG_FILE)
    statistics = getattr(tuner, "retain_statistics", None)
    if statistics is not None:
        statistics.save(Path(directory) / STATISTICS_FILE)


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
    log = RequestLog.load(directory / LOG_FILE) if (directory / LOG_FILE).exists() else RequestLog()
    for record in log.records:
        if record.name not in tuner.peft_config:
            model.load_adapter(directory / record.name, adapter_name=record.name, is_trainable=is_trainable)
    tuner._mape_request_log = log
    if (directory / STATISTICS_FILE).exists():
        tuner.retain_statistics = RetainStatistics.load(directory / STATISTICS_FILE)
    if log.records:
        active = [a for a in tuner.active_adapters if a not in log.names()] + log.names()
        tuner.set_adapter(active, inference_mode=not is_trainable)
    return model
