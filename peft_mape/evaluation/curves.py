"""Successive-request curves (SPEC §8 robustness): the metrics after each erasure request.

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
