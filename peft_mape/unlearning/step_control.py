"""How far a closed-form step goes: a line search on its scale, bounded by the retain loss.

SO and influence compute a direction d from a linearisation of "remove the forget set"; at the
specification's scale (s = 1) it can be far too long (where the retain Hessian is indefinite or
the Fisher is tiny, the 1/n step wrecks the model) or too short (a loss surface flatter than the
quadratic model). So the step applied is s·d, with s found by halving and doubling from 1:

1. the retain loss must stay within ``retain_tolerance`` of where it was (the trust region: it
   never trades the rest of the model for forgetting; when no scale down to 2^-10 keeps it,
   nothing is applied and the report says so), and then
2. with a stopping target, s is the smallest such scale that reaches it (the forget set looks
   unseen with the least change), else the largest one up to ``max_scale``.

Each scale tried costs one no-grad pass over the forget set and the report's retain prefix. The
diagnostics list every candidate, and compare the forget-loss change at the chosen scale with
the first-order prediction: where the ratio is far from 1 the linearisation does not hold there.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..common.stopping import check_target, mean_loss, retain_budget

MIN_SCALE = 2.0 ** -10  # below this the step is noise: no update instead


def halve_until(attempt: Callable[[float], dict], fits: Callable[[dict], bool], scale: float) -> tuple[float, dict]:
    """Try ``scale``, then halve it until ``fits(attempt(scale))``: ``(scale, last result)``, the
    scale 0.0 when none down to :data:`MIN_SCALE` fits (the caller then applies nothing)."""
    result = attempt(scale)
    while not fits(result) and scale / 2 >= MIN_SCALE:
        scale /= 2
        result = attempt(scale)
    return (scale if fits(result) else 0.0), result


def step_mover(params: Sequence[torch.nn.Parameter], direction: Sequence[torch.Tensor], what: str
               ) -> Callable[[float], None]:
    """``move_to(s)`` puts ``params`` at their current values plus ``s * direction`` (``move_to(0.0)``
    restores them); an error first when the direction is not finite."""
    for d in direction:
        if not torch.isfinite(d).all():
            raise FloatingPointError(f"{what} is not finite (NaN/inf in gradients or curvature)")
    starts = [p.detach().clone() for p in params]

    def move_to(scale: float) -> None:
        with torch.no_grad():
            for p, start, d in zip(params, starts, direction):
                p.copy_(start + scale * d.to(p.dtype))

    return move_to


def scaled_step(params: Sequence[torch.nn.Parameter], direction: Sequence[torch.Tensor], data, *,
                forget_gradient_sum: Sequence[torch.Tensor], target=None, retain_tolerance: float = 0.1,
                max_scale: float = 1.0) -> dict:
    """Apply ``s * direction`` to ``params`` in place for the ``s`` described in the module
    docstring; returns the diagnostics (``scale``, ``candidates``, ``linearisation_ratio``, ...)."""
    move_to = step_mover(params, direction, "the closed-form step")
    loader = data.report_loader if data.report_loader is not None else data.retain_loader

    def measure() -> dict:
        with data.retain_view():
            out = {"retain_loss": mean_loss(data.model, loader, data.loss_fn, device=data.device)}
        if target is not None:
            check = check_target(data.model, data.forget_eval_loader, target, loss_fn=data.loss_fn, device=data.device)
            out.update({k: v for k, v in check.items() if k not in ("step", "mismatched")})
        else:
            out["forget_loss"] = mean_loss(data.model, data.forget_eval_loader, data.loss_fn, device=data.device)
        return out

    start = measure()
    reference = start["retain_loss"] if data.retain_reference is None else data.retain_reference
    budget = retain_budget(reference, retain_tolerance)
    # first-order change of the mean forget loss along the direction
    num_forget = max(len(data.forget_examples), 1)
    slope = sum(float((g.double() * d.double()).sum()) for g, d in zip(forget_gradient_sum, direction)) / num_forget
    candidates = []

    def attempt(scale: float) -> dict:
        move_to(scale)
        result = dict(measure(), scale=scale)
        result["within_retain_budget"] = result["retain_loss"] <= budget
        candidates.append(result)
        return result

    def fits(result: dict) -> bool:
        return result["within_retain_budget"]

    try:
        scale = min(1.0, max_scale)
        chosen, result = halve_until(attempt, fits, scale)
        if chosen == scale:
            # Longer, while a target is not reached yet and the retain budget holds.
            while target is not None and not result.get("reached") and scale * 2 <= max_scale:
                scale *= 2
                result = attempt(scale)
                if not fits(result):
                    break
                chosen = scale
        if target is not None and chosen > 0:
            # The least change that still reaches the target.
            best = next(c for c in candidates if c["scale"] == chosen)
            while best.get("reached") and chosen / 2 >= MIN_SCALE:
                shorter = attempt(chosen / 2)
                if not (shorter.get("reached") and fits(shorter)):
                    break
                chosen, best = chosen / 2, shorter
        move_to(chosen)
    except BaseException:
        move_to(0.0)
        raise
    at = next((c for c in candidates if c["scale"] == chosen), None)
    ratio: Optional[float] = None
    if at is not None and abs(slope * chosen) > 1e-12:
        ratio = (at["forget_loss"] - start["forget_loss"]) / (slope * chosen)
    norm = chosen * sum(float(d.double().pow(2).sum()) for d in direction) ** 0.5
    return {"scale": chosen, "candidates": candidates, "retain_loss_budget": budget, "start": start,
            "first_order_forget_change": slope, "linearisation_ratio": ratio, "step_norm": norm}


def step_warnings(diagnostics: dict) -> list[str]:
    """What the report should say about a line search."""
    out = []
    if diagnostics["scale"] == 0.0:
        out.append("every step scale down to 2^-10 raised the retain loss beyond its budget: no closed-form update "
                   "was applied (the step is not selective for the forget set here: raise damping, or use a loop "
                   "method)")
    ratio = diagnostics["linearisation_ratio"]
    if ratio is not None and not 0.5 <= ratio <= 2.0:
        out.append(f"the forget loss changed {ratio:.2f}x as much as the linearisation predicts at the chosen scale: "
                   "the closed-form step's local model does not hold there")
    return out
