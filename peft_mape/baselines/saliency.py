"""*Module-oblivious weight saliency* (SalUn-style, Fan et al. 2024): the gradient of the forget
loss ranks individual weights, the top-k |gradient| weights across the network (k = MAPE's budget
in parameters) are updated with GA or GradDiff, everything else is frozen by gradient masks. It
tests whether MAPE's unit structure matters at equal budget."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..common.data import per_example_losses, to_device
from ..common.distributed import RowShard, refuse_sharded, sum_across
from ..common.loop import optimise
from ..common.stopping import target_mean
from ..common.modes import eval_mode, gradients_only_for
from ..tuner.architectures import resolve_architecture
from .shared import baseline_setup, forget_and_retain_losses, loop_hyperparameters, model_device

SALIENCY_METHODS = ("ga", "graddiff")


def saliency_candidates(model, candidates: str = "projections") -> dict[str, torch.nn.Parameter]:
    """The weights the saliency baseline may select, by parameter name.

    ``"projections"`` (default): weights and biases of the attention and FFN projections MAPE
    wraps (the pool of MAPE with ``selection="all"``), so both compete for the same weights.
    ``"all"``: every floating-point parameter (embeddings, norms and the head included).
    """
    named = dict(model.named_parameters())
    if candidates == "all":
        return {n: p for n, p in named.items() if p.is_floating_point()}
    if candidates != "projections":
        raise ValueError(f"candidates must be 'projections' or 'all', got {candidates!r}")
    modules = resolve_architecture(model, None).roles()
    chosen = {n: p for n, p in named.items() if n.rsplit(".", 1)[0] in modules}
    if not chosen:
        raise ValueError("no projection weights found; pass candidates='all'")
    return chosen


def weight_saliency_mask(model, forget_loader, num_weights: int, *, candidates: str = "projections", loss_fn=None,
                         device=None) -> dict[str, torch.Tensor]:
    """Boolean masks (one per candidate parameter) with exactly ``num_weights`` True in total.

    The selected weights have the largest |sum over the forget set of d loss / d weight|, ranked
    jointly across the network (module-oblivious). One backward pass per forget batch, dropout
    off; the model's weights, gradients and requires_grad flags are left as they were.
    """
    refuse_sharded(model, "the SalUn saliency mask")
    device = model_device(model, device)
    pool = saliency_candidates(model, candidates)
    total = sum(p.numel() for p in pool.values())
    if not 1 <= num_weights <= total:
        raise ValueError(f"num_weights must be between 1 and the {total:,} candidate weights, got {num_weights}")
    grads = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in pool.items()}
    with gradients_only_for(model, pool.values()), eval_mode(model):
        for batch in RowShard(forget_loader):
            batch = to_device(batch, device)
            values = torch.autograd.grad(per_example_losses(model, batch, loss_fn).sum(), list(pool.values()),
                                         allow_unused=True)
            for name, g in zip(pool, values):
                if g is not None:
                    grads[name] += g.float()
    sum_across(list(grads.values()))
    flat = torch.cat([g.abs().reshape(-1) for g in grads.values()])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, num_weights, sorted=False).indices] = True
    masks, start = {}, 0
    for name, g in grads.items():
        masks[name] = chosen[start:start + g.numel()].view(g.shape)
        start += g.numel()
    return masks


def salun_unlearn(model, forget, retain=None, *, num_weights: Optional[int] = None, density: Optional[float] = None,
                  method: str = "graddiff", candidates: str = "projections", holdout=None,
                  forget_loss_target: Optional[float] = None, **options) -> dict:
    """Weight-saliency unlearning: GA/GradDiff on the top-k salient weights only.

    The budget is ``num_weights`` (e.g. a MAPE report's ``trainable_parameters``, for equal
    budgets) or ``density`` (a fraction of the candidate weights). ``options`` are those of the
    loop method (``lr``, default 2e-4; ``max_steps``, ``retain_weight``, ...) and of the run
    (``seed``, ``batch_size``, ``loss_fn``, ``progress``, default off), as for ``unlearn()``.
    This **modifies the model's weights in place** (pass ``copy.deepcopy(model)`` to keep the
    original); if anything raises, the selected weights are restored to their previous values.
    Gradients of unselected weights are zeroed by hooks, and Adam (no weight decay) leaves
    weights with zero gradients exactly unchanged, so only the selected weights move.
    """
    if (num_weights is None) == (density is None):
        raise ValueError("pass exactly one of num_weights= or density=")
    update_loss, data, target = baseline_setup(model, forget, retain, method, SALIENCY_METHODS, holdout,
                                                forget_loss_target, options)
    forget_before, retain_before = forget_and_retain_losses(model, data)
    seconds = data.timer.seconds
    seed, loss_fn, device = data.options.seed, data.loss_fn, data.device

    with data.timer.phase("saliency"):
        if density is not None:
            if not 0.0 < density <= 1.0:
                raise ValueError(f"density must be in (0, 1], got {density}")
            pool_size = sum(p.numel() for p in saliency_candidates(model, candidates).values())
            num_weights = max(1, round(density * pool_size))
        masks = weight_saliency_mask(model, data.forget_loader, int(num_weights), candidates=candidates,
                                     loss_fn=loss_fn, device=device)

    named = dict(model.named_parameters())
    selected = {n: m for n, m in masks.items() if m.any()}
    originals = {n: named[n].detach()[m].clone() for n, m in selected.items()}
    hooks = []
    try:
        with data.timer.phase("update"), gradients_only_for(model, [named[n] for n in selected]):
            for n, m in selected.items():
                hooks.append(named[n].register_hook(lambda g, m=m: g * m.to(g.dtype)))
            torch.manual_seed(seed)
            loop = optimise(model, [named[n] for n in selected], update_loss, data.loop_data(),
                            lr=update_loss.step_size(False), target=target)
    except BaseException:
        with torch.no_grad():
            for n, m in selected.items():
                named[n][m] = originals[n]
        raise
    finally:
        for hook in hooks:
            hook.remove()

    forget_after, retain_after = forget_and_retain_losses(model, data)
    with torch.no_grad():
        update_norm = math.sqrt(sum(float((named[n][m] - originals[n]).double().pow(2).sum())
                                    for n, m in selected.items()))
    return {
        "method": f"salun-{method}", "num_forget": len(data.forget_examples), "num_retain": len(data.retain_examples),
        "trainable_parameters": int(num_weights), "candidates": candidates,
        "selected_per_parameter": {n: int(m.sum()) for n, m in selected.items()},
        "forget_loss_before": forget_before, "forget_loss_after": forget_after,
        "retain_loss_before": retain_before, "retain_loss_after": retain_after, "update_norm": update_norm,
        "steps": loop.steps, "stopped_early": loop.stopped_early, "forget_loss_target": target_mean(target),
        "stopping": loop.stopping(target), "warnings": loop.warnings,
        "hyperparameters": loop_hyperparameters(update_loss, data), "seconds": seconds,
    }
