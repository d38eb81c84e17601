"""Snapshots of the task head (e.g. a classifier) taken after each stage.

The head is trained outside PEFT: PEFT's ``modules_to_save`` keeps one head copy per adapter but
allows only one active adapter, while serving a shard activates a whole prefix of stage adapters
at once. Instead the live head parameters are overwritten from the snapshot that belongs to the
served stage, which restores them bit for bit.

No head modules (a causal LM whose tied output head stays frozen) means nothing to snapshot:
every snapshot is empty and restoring one is a no-op.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

INITIAL = "initial"


class HeadSnapshots:
    def __init__(self, model: nn.Module, head_modules: Sequence[str]):
        self.parameters: dict[str, nn.Parameter] = {}
        for wanted in head_modules:
            matches = [name for name, _ in model.named_modules() if name == wanted or name.endswith("." + wanted)]
            if not matches:
                raise ValueError(f"head module {wanted!r} not found in {type(model).__name__}")
            for module_name in matches:
                module = model.get_submodule(module_name)
                for param_name, param in module.named_parameters():
                    self.parameters[f"{module_name}.{param_name}"] = param
        if head_modules and not self.parameters:
            raise ValueError(f"head modules {tuple(head_modules)} hold no parameters")
        self.snapshots: dict[str, dict[str, torch.Tensor]] = {}

    def capture(self, key: str) -> None:
        self.snapshots[key] = {name: p.detach().clone() for name, p in self.parameters.items()}

    def restore(self, key: str) -> None:
        if not self.parameters:  # no head: a saved model has no snapshots to restore either
            return
        if key not in self.snapshots:
            raise KeyError(f"no head snapshot {key!r}")
        with torch.no_grad():
            for name, param in self.parameters.items():
                param.copy_(self.snapshots[key][name])

    def drop(self, key: str) -> None:
        self.snapshots.pop(key, None)

    def set_trainable(self, trainable: bool) -> list:
        for param in self.parameters.values():
            param.requires_grad_(trainable)
        return list(self.parameters.values()) if trainable else []

    def flat(self) -> dict[str, torch.Tensor]:
        """All snapshots as one flat tensor dict (``"<snapshot>/<parameter>"``) for safetensors."""
        return {f"{key}/{name}": t.contiguous() for key, snap in self.snapshots.items() for name, t in snap.items()}

    def load_flat(self, tensors: dict[str, torch.Tensor]) -> None:
        snapshots: dict[str, dict[str, torch.Tensor]] = {}
        for flat_name, tensor in tensors.items():
            key, name = flat_name.split("/", 1)
            if name not in self.parameters:
                raise ValueError(f"saved head parameter {name!r} does not exist in this model")
            snapshots.setdefault(key, {})[name] = tensor
        for key, snap in snapshots.items():
            if set(snap) != set(self.parameters):
                raise ValueError(f"head snapshot {key!r} does not cover the head parameters")
        self.snapshots = snapshots
