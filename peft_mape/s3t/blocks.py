"""Layer blocks: which LoRA-carrying modules belong to which stage, matched by exact layer index.

The official S3T code selected a block with the substring "layers.1", which also caught layers
10–19. Here a module's layer index is parsed from its dotted name and compared as an integer, and
each block's adapter lists the full names of its modules, so no other layer can match.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Optional, Sequence

import numpy as np
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

# The first numbered path segment, e.g. "bert.encoder.layer.11.attention.self.query" -> 11.
_FIRST_NUMBERED_SEGMENT = re.compile(r"^(?:.*?\.)?[^.]+\.(?P<index>\d+)(?:\.|$)")


def layer_index(module_name: str, layers_pattern: Optional[str] = None) -> Optional[int]:
    """Layer index of ``module_name`` as an integer, or ``None`` outside the layer stack."""
    if layers_pattern is None:
        match = _FIRST_NUMBERED_SEGMENT.match(module_name)
    else:
        match = re.match(rf"^(?:.*?\.)?{re.escape(layers_pattern)}\.(?P<index>\d+)(?:\.|$)", module_name)
    return int(match.group("index")) if match else None


def split_layers(layer_indices: Sequence[int], num_blocks: int) -> list[tuple[int, ...]]:
    """Contiguous blocks of layers, top (highest index, output side) block first."""
    top_first = sorted(set(layer_indices), reverse=True)
    if len(top_first) < num_blocks:
        raise ValueError(
            f"{num_blocks} slices need {num_blocks} layer blocks, but LoRA targets only "
            f"{len(top_first)} layer(s): {sorted(top_first)}"
        )
    return [tuple(int(i) for i in chunk) for chunk in np.array_split(np.array(top_first), num_blocks)]


def targeted_modules(model: nn.Module, lora: LoraConfig, head_modules: Sequence[str]) -> list[str]:
    """Names of the modules the user's LoRA recipe targets, as PEFT itself would match them."""
    config = lora
    if lora.target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if default is None:
            raise ValueError(f"lora.target_modules is unset and PEFT has no default for model type {model_type!r}")
        config = dataclasses.replace(lora, target_modules=list(default))
    names = []
    for name, module in model.named_modules():
        if not name or _is_inside(name, head_modules):
            continue
        if config.target_modules == "all-linear":
            matched = isinstance(module, nn.Linear)
        else:
            matched = bool(check_target_module_exists(config, name))
        if matched:
            names.append(name)
    if not names:
        raise ValueError(f"lora.target_modules={lora.target_modules!r} matches no module of the model")
    return names


def resolve_blocks(
    model: nn.Module,
    lora: LoraConfig,
    num_blocks: int,
    layer_blocks: Optional[Sequence[Sequence[int]]],
    layers_pattern: Optional[str],
    head_modules: Sequence[str],
) -> tuple[list[tuple[int, ...]], list[list[str]]]:
    """(blocks, module names per block), top block first."""
    by_layer: dict[int, list[str]] = {}
    outside = []
    for name in targeted_modules(model, lora, head_modules):
        index = layer_index(name, layers_pattern)
        if index is None:
            outside.append(name)
        else:
            by_layer.setdefault(index, []).append(name)
    if outside:
        warnings.warn(
            f"S3T places LoRA only on the layer stack; ignoring targeted modules outside it: {outside}",
            stacklevel=3,
        )
    if not by_layer:
        raise ValueError("no LoRA-targeted module lies in a numbered layer; set S3TConfig.layers_pattern")
    if layer_blocks is None:
        blocks = split_layers(list(by_layer), num_blocks)
    else:
        blocks = [tuple(block) for block in layer_blocks]
        missing = sorted(i for block in blocks for i in block if i not in by_layer)
        if missing:
            raise ValueError(
                f"layer_blocks name layer(s) {missing} that carry no LoRA target; available: {sorted(by_layer)}"
            )
    modules = [sorted(name for i in block for name in by_layer[i]) for block in blocks]
    return blocks, modules


def block_lora_config(lora: LoraConfig, module_names: Sequence[str]) -> LoraConfig:
    """The user's LoRA recipe restricted to exactly ``module_names`` (full dotted names)."""
    return dataclasses.replace(
        lora,
        target_modules=list(module_names),
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
        modules_to_save=None,
        task_type=None,
    )


def _is_inside(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.endswith("." + p) or f".{p}." in f".{name}" for p in prefixes)
