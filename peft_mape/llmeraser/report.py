"""What an influence edit reports, and how it is undone."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..common.files import atomic_write

GUARANTEE = "approximate"


@dataclass
class EditReport:
    """The outcome of :func:`peft_mape.llmeraser.erase`.

    ``requests``: kind, sizes and a content fingerprint of each request (never the examples).
    ``adapter_name`` was edited, or copied to ``edited_adapter`` first. ``losses_before`` /
    ``losses_after``: mean loss of the edited examples before the change (``old``), after it
    (``new``, corrections and modifications) and of the training sample the trust region guards
    (``train``). The solve: ``damping`` (and the rule that chose it; every damping tried), the ``curvature`` matrix, ``solver_iterations``,
    ``relative_residual`` of (H + damping I) x = b on the Hessian sample, ``negative_curvature``
    met by CG. The step: the ``scale`` applied (1 is the first-order edit), ``update_norm`` of
    what was applied, ``full_step_norm`` at scale 1, ``linearisation_ratio`` (measured change of
    mean old loss minus mean new loss over the first-order prediction at the chosen scale: far
    from 1, the edit left the region where the influence approximation holds) and every scale
    tried with the guarded training loss there (``candidates``). ``seconds`` per phase. ``guarantee`` is always "approximate".
    """

    requests: list
    adapter_name: str
    edited_adapter: str
    num_train_examples: int
    num_train_examples_source: str
    hessian_examples: int
    damping: float
    damping_rule: str
    dampings_tried: list
    curvature: str
    solver: str
    solver_iterations: int
    relative_residual: float
    negative_curvature: bool
    scale: float
    update_norm: float
    full_step_norm: float
    linearisation_ratio: Optional[float]
    losses_before: dict
    losses_after: dict
    retain_loss_budget: Optional[float]
    candidates: list
    warnings: list
    seconds: dict
    guarantee: str = GUARANTEE
    # The adapter's tensors as they were, by parameter name: what undo() restores, bit for bit.
    originals: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "originals"}
        return json.loads(json.dumps(out, default=float))

    def save(self, path) -> None:
        """Write :meth:`to_dict` as JSON to ``path`` (atomically)."""
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(self.to_dict(), indent=2)))


def restore_adapter(model, originals: dict, adapter_name: str, edited_adapter: str) -> None:
    """Put back what an edit changed: delete the copy ``edited_adapter`` (making ``adapter_name``
    active again) when the edit wrote into a copy, else copy ``originals`` (parameter name ->
    tensor) back into the model. Also what a failed :func:`erase` runs."""
    if edited_adapter != adapter_name:
        if edited_adapter in model.peft_config:
            model.set_adapter(adapter_name)
            model.delete_adapter(edited_adapter)
        return
    params = dict(model.named_parameters())
    missing = [name for name in originals if name not in params]
    if missing:
        raise ValueError(f"undo: the model has no parameter {missing[0]!r}; it is not the model this edit changed")
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)


def undo(model, report: EditReport) -> None:
    """Put ``model`` back exactly as it was before the edit of ``report``: the copy adapter is
    deleted (and the original made active again), or the edited tensors restored."""
    restore_adapter(model, report.originals, report.adapter_name, report.edited_adapter)
