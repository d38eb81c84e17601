"""``UnlearnReport``: what one ``unlearn()`` call did, JSON-serialisable."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class UnlearnReport:
    adapter_name: str
    method: str
    sparsity: float
    units: str
    num_forget: int
    num_retain: int
    selected_heads: dict[str, list[int]]
    selected_filters: dict[str, list[int]]
    num_selected_heads: int
    num_selected_filters: int
    trainable_parameters: int
    scores: dict[str, list[list[float]]]
    seconds: dict[str, float]
    forget_loss_before: float
    forget_loss_after: float
    retain_loss_before: Optional[float]
    retain_loss_after: Optional[float]
    update_norm: float
    hyperparameters: dict = field(default_factory=dict)
    steps: int = 0
    stopped_early: bool = False
    forget_loss_target: Optional[float] = None
    warnings: list[str] = field(default_factory=list)
    # Method-specific results: the influence solver's relative residual, the loop's forget-loss trace.
    diagnostics: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def summary(self) -> str:
        retain = (
            f"retain loss {self.retain_loss_before:.4f} -> {self.retain_loss_after:.4f}; "
            if self.retain_loss_before is not None else ""
        )
        return (
            f"[{self.adapter_name}] {self.method}: {self.num_selected_heads} heads + "
            f"{self.num_selected_filters} filters selected ({self.trainable_parameters:,} params); "
            f"forget loss {self.forget_loss_before:.4f} -> {self.forget_loss_after:.4f}; {retain}"
            f"update norm {self.update_norm:.4g}; {sum(self.seconds.values()):.1f}s"
        )
