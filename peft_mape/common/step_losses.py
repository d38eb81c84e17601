"""The per-example quantities of one optimisation step (:class:`StepLosses`), computed on a pair
of batches (:func:`batch_losses`) or, with several processes, on this rank's rows of the global
batches and joined back (:func:`step_losses`). The loop (:mod:`.loop`) and ``UnlearningTrainer``
both read them; a method's loss is a function of them alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from .data import forward_with_losses, per_example_kl, per_example_losses, to_device
from .distributed import rejoin_rows, split_rows, stand_in_rows

if TYPE_CHECKING:
    from .loop import LoopMethod


@dataclass
class StepLosses:
    """Per-example quantities of one optimisation step; the loop fills what the method needs.

    ``forget_reference``: forget losses of the reference model (this adapter muted, no gradient).
    ``retain_kl``: KL(reference || current) of the outputs on the retain batch.
    ``forget_cap``: the per-example loss at which an example looks unseen (the stopping target's
    level), or None without a target; see :meth:`LoopMethod.forget_weights`.
    """

    forget: torch.Tensor
    retain: Optional[torch.Tensor] = None
    forget_reference: Optional[torch.Tensor] = None
    retain_kl: Optional[torch.Tensor] = None
    forget_cap: Optional[float] = None



def batch_losses(model, method: "LoopMethod", forget: Optional[dict], retain: Optional[dict] = None, *, loss_fn=None,
                 reference=None, full_forward: bool = False) -> StepLosses:
    """The per-example quantities ``method`` needs on these batches (on the model's device; a
    ``None`` batch leaves its fields ``None``). ``full_forward`` runs every differentiated pass
    through ``model(**batch)`` (a DDP wrapper must see the forward to synchronise gradients),
    never the answer-positions-only shortcut of :func:`~.data.forward_with_losses`."""
    losses = StepLosses(forget=None)
    if forget is not None:
        losses.forget = forward_with_losses(model, forget, loss_fn, need_outputs=full_forward)[1]
        if method.needs_reference:
            with torch.no_grad(), reference():
                losses.forget_reference = per_example_losses(model, forget, loss_fn)
    if retain is not None:
        needs_kl = method.kl_weight > 0
        outputs, losses.retain = forward_with_losses(model, retain, loss_fn, need_outputs=needs_kl or full_forward)
        if needs_kl:
            with torch.no_grad(), reference():
                reference_logits = model(**retain).logits
            losses.retain_kl = per_example_kl(reference_logits, outputs.logits, retain)
    return losses


def step_losses(model, method: "LoopMethod", forget_batch: dict, retain_batch: Optional[dict], *, loss_fn,
                 device, reference, lockstep: bool = False) -> tuple[StepLosses, Optional[torch.Tensor]]:
    """The per-example quantities of one step over its global batches. With several processes
    each rank computes its rows (:func:`~.distributed.split_rows`) and gets every row back, its own
    still differentiable, so the method's objective is the one-process objective on every rank.

    ``lockstep`` (FSDP2): a rank without rows of a batch runs it on a stand-in row all the same;
    the second value is then a zero that keeps those passes in the backward graph (else None)."""
    empty = torch.zeros(0, device=device)
    stand_ins = set()

    def rows(side, batch):
        if batch is None:
            return None, 0
        local, size = split_rows(batch)
        if local is None and lockstep:
            local = stand_in_rows(batch)
            stand_ins.add(side)
        return (to_device(local, device) if local is not None else None), size

    (forget, forget_size), (retain, retain_size) = rows("forget", forget_batch), rows("retain", retain_batch)
    local = batch_losses(model, method, forget, retain, loss_fn=loss_fn, reference=reference)
    anchors = []
    if "forget" in stand_ins:
        anchors.append(local.forget)
        local.forget = local.forget_reference = None
    if "retain" in stand_ins:
        anchors.append(local.retain)
        local.retain = local.retain_kl = None
    losses = StepLosses(forget=rejoin_rows(local.forget, forget_size, like=empty))
    if method.needs_reference:
        losses.forget_reference = rejoin_rows(local.forget_reference, forget_size, like=empty)
    if retain_batch is not None:
        losses.retain = rejoin_rows(local.retain, retain_size, like=empty)
        if method.kl_weight > 0:
            losses.retain_kl = rejoin_rows(local.retain_kl, retain_size, like=empty)
    return losses, (sum(0 * a.sum() for a in anchors) if anchors else None)
