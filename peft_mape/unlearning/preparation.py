"""The prepare phase: turn the user's forget / retain / holdout data into one :class:`UnlearningData`.

Built once per request and read by every later phase (statistics, search, update, measure) and
by the baselines, so the loaders, the loss, the device, the padding id and the progress switch
are decided in one place. Validation runs here, before any work starts.
"""

from __future__ import annotations

import time
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Optional

from ..common.data import (
    MIN_EVAL_BATCH_SIZE, drop_overlap, fingerprint, forward_arguments, make_eval_loader, make_loader, materialise,
    pad_token_id, validate_examples,
)
from ..common.distributed import check_same_data, is_main_process, join_launch
from ..common.loop import LoopData
from ..common.stopping import HoldoutTarget, example_losses, mean_loss

REPORT_RETAIN = 256  # retain examples behind the report's before/after retain loss
MAX_RETAIN_EXAMPLES = 1024  # MAPEConfig.max_retain_examples' default: cost independent of |D_r|


@dataclass
class RunOptions:
    """Options of one ``unlearn()`` run that belong to no update rule.

    Args:
        seed: seeds the retain sample, the shuffled retain batches and the update.
        batch_size: examples per statistics batch and per update step.
        eval_batch_size: examples per batch of the no-grad loss passes (report losses, stopping
            checks, holdout target); default ``max(batch_size, 32)``: they keep no activations
            for a backward pass, so larger, length-sorted batches are cheaper.
        loss_fn: ``loss_fn(outputs, batch) -> tensor[batch]`` of per-example losses; default the
            model's own (cross-entropy; answer-token mean for causal LMs).
        progress: show tqdm bars.
        fold_other_adapters: while the run lasts, apply the other active adapters (earlier
            requests) through one precomputed weight per layer, so a request costs the same
            however many came before; costs one copy of the affected fp32 projection weights.
        on_check: ``on_check(record) -> dict | None``, called at each check of a loop method's
            update with that check's record (``step``, ``forget_loss``, ``auc`` with a holdout)
            while the model holds the weights just checked, before the trust region accepts or
            rolls them back; a returned dict is merged into the record. With it the loop checks
            every ``eval_every`` steps even without a stopping target, so
            ``report.diagnostics["stopping"]["checks"]`` is a trajectory of the caller's metrics
            (trade-off curves, comparisons at matched forgetting).
        sparsity, units, objective: per-call overrides of the adapter config's mask search.
    """

    seed: int = 0
    batch_size: int = 16
    eval_batch_size: Optional[int] = None
    loss_fn: Optional[Callable] = None
    progress: bool = True
    fold_other_adapters: bool = True
    on_check: Optional[Callable[[dict], Optional[dict]]] = None
    sparsity: Optional[float] = None
    units: Optional[str] = None
    objective: Optional[str] = None

    def validate(self) -> None:
        for option in ("batch_size", "eval_batch_size"):
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{option} must be an integer >= 1, got {value!r}")
        if self.on_check is not None and not callable(self.on_check):
            raise ValueError(f"on_check must be a callable taking a check record, got {self.on_check!r}")


RUN_OPTION_NAMES = tuple(f.name for f in fields(RunOptions))


class PhaseTimer:
    """Seconds per phase, accumulated; the report's ``seconds``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        clock = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - clock


@dataclass
class UnlearningData:
    """Everything the phases read about one request's data.

    ``forget_loader`` / ``retain_loader``: the sets in order (statistics, gradients);
    ``train_loader``: shuffled retain batches for the update loop; ``forget_eval_loader`` /
    ``report_loader``: length-sorted batches for no-grad loss passes (the report's retain loss
    uses a fixed prefix of the random retain sample). ``retain_source_size`` is the size of the
    retain data the user passed, before sampling (for the 1/n estimate of closed-form steps).
    ``retain_view()`` is the context in which the trust regions measure the retain loss, and
    ``retain_reference`` the loss their budget is relative to (see
    :class:`~peft_mape.common.loop.LoopData`).
    """

    model: Any
    forget_examples: list
    retain_examples: list
    options: RunOptions
    device: Any
    pad_token_id: int
    retain_source_size: int
    forget_loader: Any = None
    forget_eval_loader: Any = None
    retain_loader: Any = None
    train_loader: Any = None
    report_loader: Any = None
    report_warnings: list[str] = field(default_factory=list)  # the report's ``warnings``
    retain_view: Callable[[], AbstractContextManager] = nullcontext
    retain_reference: Optional[float] = None
    timer: PhaseTimer = field(default_factory=PhaseTimer)

    @property
    def loss_fn(self):
        return self.options.loss_fn

    @property
    def progress(self) -> bool:
        return self.options.progress and is_main_process()  # one set of bars, not one per process

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.options.eval_batch_size or max(self.options.batch_size, MIN_EVAL_BATCH_SIZE)

    def loop_data(self) -> LoopData:
        """The batches of the update loop: forget batches, shuffled retain batches, sorted checks."""
        return LoopData(forget=self.forget_loader, retain=self.train_loader, check=self.forget_eval_loader,
                        retain_check=self.report_loader, retain_view=self.retain_view,
                        retain_reference=self.retain_reference, loss_fn=self.loss_fn, device=self.device,
                        progress=self.progress, on_check=self.options.on_check)

    def mean_loss(self, loader) -> float:
        return mean_loss(self.model, loader, self.loss_fn, device=self.device)


def _source_size(source, examples) -> int:
    source = getattr(source, "dataset", source)  # a DataLoader's len() counts batches
    return len(source) if hasattr(source, "__len__") else len(examples)


def prepare(model, forget, retain=None, *, options: Optional[RunOptions] = None, exclude: Iterable[str] = (),
            max_retain_examples: int = MAX_RETAIN_EXAMPLES) -> UnlearningData:
    """Materialise and validate the forget set and the (capped, de-duplicated) retain sample,
    and build every loader the later phases read.

    ``model`` is the network whose forward computes the losses (a MAPE tuner's ``model``, or a
    plain model for the baselines). ``exclude`` holds fingerprints of examples removed by
    earlier requests: they are left out of the retain sample.
    """
    options = options or RunOptions()
    options.validate()
    join_launch()
    timer = PhaseTimer()
    with timer.phase("data"):
        needs_labels = options.loss_fn is None
        allowed = forward_arguments(model)
        forget_examples = materialise(forget, allowed, what="forget") if forget is not None else []
        if forget is not None:
            validate_examples(forget_examples, "forget", needs_labels=needs_labels, model=model)
        retain_examples = materialise(retain, allowed, limit=int(max_retain_examples), seed=options.seed,
                                      what="retain")
        report_warnings: list[str] = []
        if retain_examples:
            validate_examples(retain_examples, "retain", needs_labels=needs_labels, model=model)
            exclude = set(exclude)
            if exclude:
                before = len(retain_examples)
                retain_examples = [e for e in retain_examples if fingerprint(e) not in exclude]
                if len(retain_examples) != before:
                    report_warnings.append(f"{before - len(retain_examples)} retain example(s) removed by earlier requests "
                                 "were left out")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                retain_examples = drop_overlap(retain_examples, forget_examples)
            for w in caught:
                report_warnings.append(str(w.message))
                warnings.warn(w.message, UserWarning, stacklevel=3)
        check_same_data("forget", forget_examples)
        check_same_data("retain", retain_examples)
        device = next(model.parameters()).device
        data = UnlearningData(model=model, forget_examples=forget_examples, retain_examples=retain_examples,
                              options=options, device=device, pad_token_id=pad_token_id(model),
                              retain_source_size=_source_size(retain, retain_examples),
                              report_warnings=report_warnings, timer=timer)
        _build_loaders(data)
    return data


def _build_loaders(data: UnlearningData) -> None:
    pad, size, eval_size, seed = data.pad_token_id, data.batch_size, data.eval_batch_size, data.options.seed
    if data.forget_examples:
        data.forget_loader = make_loader(data.forget_examples, size, pad)
        data.forget_eval_loader = make_eval_loader(data.forget_examples, eval_size, pad)
    if data.retain_examples:
        data.retain_loader = make_loader(data.retain_examples, size, pad)
        data.train_loader = make_loader(data.retain_examples, size, pad, shuffle=True, seed=seed)
        data.report_loader = make_eval_loader(data.retain_examples[:REPORT_RETAIN], eval_size, pad)


def holdout_target(data: UnlearningData, holdout, max_examples: int = MAX_RETAIN_EXAMPLES) -> HoldoutTarget:
    """The per-example losses of ``holdout`` (data the model never trained on) at the current
    weights: the forget set looks unseen once a membership attack cannot tell it from them."""
    with data.timer.phase("evaluation"):
        examples = materialise(holdout, forward_arguments(data.model), limit=int(max_examples),
                               seed=data.options.seed, what="holdout")
        validate_examples(examples, "holdout", needs_labels=data.loss_fn is None, model=data.model)
        loader = make_eval_loader(examples, data.eval_batch_size, data.pad_token_id)
        return HoldoutTarget(example_losses(data.model, loader, data.loss_fn, device=data.device))
