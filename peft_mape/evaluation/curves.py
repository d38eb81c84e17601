"""Successive-request curves (SPEC §8 robustness): the metrics after each erasure request; and
the utility along one request's trajectory where it matches the retrained model's forgetting.

A deployed model receives requests one after another. The curve records the metrics before
any request (point 0) and after each one, with the time each request took, so that methods can
be compared on how they degrade (test accuracy, retain loss) and how well each request's
examples stay forgotten as more requests arrive.

The driver is method-agnostic: ``apply(index, request)`` performs one request on the model
(MAPE's per-request adapters, a full-parameter update, a baseline, retraining) and
``evaluate(index)`` returns the metrics to record. Nothing here knows about the library.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from tqdm.auto import tqdm


@dataclass
class RequestCurve:
    """``points[i]``: {"request": i, "seconds": ..., metric: value, ...}; point 0 = before any request."""

    label: str
    points: list[dict[str, Any]] = field(default_factory=list)

    def series(self, metric: str) -> tuple[list[int], list[float]]:
        """(request numbers, values) of one metric, skipping points that lack it."""
        rows = [(p["request"], float(p[metric])) for p in self.points if p.get(metric) is not None]
        if not rows:
            raise KeyError(f"no point of curve '{self.label}' has the metric '{metric}'; "
                           f"known: {sorted({k for p in self.points for k in p} - {'request', 'seconds'})}")
        return [r[0] for r in rows], [r[1] for r in rows]

    def to_dict(self) -> dict:
        return {"label": self.label, "points": self.points}

    @classmethod
    def from_dict(cls, data: dict) -> "RequestCurve":
        return cls(label=data["label"], points=list(data["points"]))


def split_into_requests(examples: Sequence, num_requests: int, seed: int = 0) -> list[list]:
    """Shuffle ``examples`` (seeded) and cut them into ``num_requests`` near-equal requests."""
    if not 1 <= num_requests <= len(examples):
        raise ValueError(f"num_requests must be between 1 and the number of examples ({len(examples)}), "
                         f"got {num_requests}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [[examples[i] for i in order[r::num_requests]] for r in range(num_requests)]


def successive_request_curve(requests: Sequence, apply: Callable[[int, Any], Any],
                             evaluate: Callable[[int], dict], *, label: str = "method",
                             progress: bool = False, on_point: Optional[Callable[[dict], None]] = None
                             ) -> RequestCurve:
    """Run the requests in order, recording ``evaluate(i)`` before any (i = 0) and after each.

    ``apply(i, request)`` is called with i = 1, 2, ...; its wall time is the point's
    ``seconds`` (evaluation excluded). If ``apply`` returns a dict, its numeric entries are
    recorded too (e.g. a report's selected-unit counts), under the prefix ``request_``.
    ``on_point(point)`` sees each point as soon as it exists (e.g. to save partial results).
    """
    curve = RequestCurve(label=label)

    def record(point: dict) -> None:
        curve.points.append(point)
        if on_point is not None:
            on_point(point)

    record({"request": 0, "seconds": 0.0, **evaluate(0)})
    for i, request in enumerate(tqdm(requests, desc=f"requests ({label})", disable=not progress, leave=False), 1):
        clock = time.perf_counter()
        outcome = apply(i, request)
        seconds = time.perf_counter() - clock
        extra = {f"request_{k}": v for k, v in outcome.items() if isinstance(v, (int, float))} \
            if isinstance(outcome, dict) else {}
        record({"request": i, "seconds": seconds, **extra, **evaluate(i)})
    return curve


def utility_at_forget_level(points: Sequence[dict], level: float, *, forget: str = "forget_acc",
                            utility: str = "test_acc", forgetting_lowers: bool = True,
                            higher_is_better: bool = True) -> dict[str, Any]:
    """A method's utility where its forget metric first reaches ``level`` (the retrained model's),
    interpolated linearly between the two trajectory points around it: the comparison of methods
    at matched forgetting rather than after the same number of steps.

    ``points``: the trajectory in order, the first one the model before any update.
    ``forgetting_lowers``: forgetting moves the forget metric down (an accuracy; False for a
    loss, which rises). A start already at or past ``level`` counts as reached there.

    Returns ``{"reached", "utility", "at", "step", "best"}``: ``at`` is the fractional index of
    the crossing among the points that have both metrics, ``step`` the interpolated ``"step"`` of
    those points (None where they have none); ``best`` the best utility (``higher_is_better``) at
    the crossing or at any later point still at or past ``level``: utility measured between
    checks is noisy, and a method that recovers utility while staying forgotten (a retain term
    settling) is better than its first crossing says. When the trajectory never gets there,
    ``utility`` and ``best`` are None and ``"closest"`` is its nearest forget value.
    """
    rows = [(float(p[forget]), float(p[utility]), p.get("step")) for p in points
            if p.get(forget) is not None and p.get(utility) is not None]
    if not rows:
        raise ValueError(f"no point has both '{forget}' and '{utility}'")
    direction = -1.0 if forgetting_lowers else 1.0

    def reached(value: float) -> bool:
        return (value - level) * direction >= 0

    pick = max if higher_is_better else min

    def crossing(utility_there: float, at: float, step, later: int) -> dict[str, Any]:
        best = pick([utility_there] + [u for f, u, _ in rows[later:] if reached(f)])
        return {"reached": True, "utility": utility_there, "at": at, "step": step, "best": best}

    if reached(rows[0][0]):
        return crossing(rows[0][1], 0.0, rows[0][2], 1)
    for i in range(1, len(rows)):
        (f0, u0, s0), (f1, u1, s1) = rows[i - 1], rows[i]
        if reached(f1):
            share = (level - f0) / (f1 - f0)
            step = None if s0 is None or s1 is None else s0 + share * (s1 - s0)
            return crossing(u0 + share * (u1 - u0), i - 1 + share, step, i)
    closest = min((f for f, _, _ in rows), key=lambda f: abs(f - level))
    return {"reached": False, "utility": None, "at": None, "step": None, "best": None, "closest": closest}
