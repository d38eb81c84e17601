"""The Trainer's training data: each example pairs a forget example with a retain example."""

from __future__ import annotations

from typing import Optional

from torch.utils.data import Dataset

from ..common.data import Example, pad_collate


class PairedExamples(Dataset):
    """Item ``i``: ``{"forget": forget[i mod |forget|], "retain": retain[i mod |retain|]}``
    (no ``"retain"`` without retain examples). Its length is that of the larger set, so one epoch
    of the Trainer's (shuffled, per-process) sampler sees every example of both at least once."""

    def __init__(self, forget: list[Example], retain: Optional[list[Example]] = None):
        if not forget:
            raise ValueError("the forget set is empty: unlearning needs at least one forget example")
        self.forget, self.retain = forget, retain or []

    def __len__(self) -> int:
        return max(len(self.forget), len(self.retain))

    def __getitem__(self, index: int) -> dict:
        item = {"forget": self.forget[index % len(self.forget)]}
        if self.retain:
            item["retain"] = self.retain[index % len(self.retain)]
        return item


class PairedCollator:
    """Pads each side of a list of :class:`PairedExamples` items into its own batch."""

    def __init__(self, pad_token_id: int = 0):
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[dict]) -> dict:
        return {side: pad_collate([item[side] for item in items], self.pad_token_id) for side in items[0]}
