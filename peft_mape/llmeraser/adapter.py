"""The LoRA adapter an edit writes into: which PEFT model it accepts, its tensors, a copy of it."""

from __future__ import annotations

import copy

import torch

# Parameter-name segments under which PEFT keeps an adapter's tensors: LoRA's factors (linear,
# conv and embedding layers), DoRA's magnitudes, and the full copies of ``modules_to_save``.
ADAPTER_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                      "modules_to_save")


def active_lora_adapter(model) -> str:
    """The name of ``model``'s one active adapter; an error unless it is a PEFT LoRA adapter."""
    from peft import LoraConfig, PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"model: an influence edit needs a peft.PeftModel whose active adapter is LoRA, got "
                        f"{type(model).__name__} (wrap it with peft.get_peft_model(model, LoraConfig(...)) or load "
                        "it with PeftModel.from_pretrained)")
    name = model.active_adapter
    if not isinstance(name, str):
        raise ValueError(f"model: exactly one adapter must be active, got {list(name)}; call model.set_adapter(NAME)")
    config = model.peft_config[name]
    if not isinstance(config, LoraConfig):
        raise TypeError(f"model: the active adapter {name!r} is {type(config).__name__}; the influence edit "
                        "writes into LoRA adapters (LoraConfig)")
    return name


def _owner(name: str, adapter: str) -> bool:
    parts = name.split(".")
    return any(part == adapter and i > 0 and parts[i - 1] in ADAPTER_CONTAINERS for i, part in enumerate(parts))


def adapter_parameters(model, adapter: str) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of every tensor of ``adapter`` (LoRA factors and ``modules_to_save``),
    whatever their ``requires_grad`` (an adapter loaded for inference has it off)."""
    found = [(name, p) for name, p in model.named_parameters() if _owner(name, adapter)]
    if not found:
        raise ValueError(f"model: adapter {adapter!r} owns no parameters")
    return found


def _renamed(name: str, source: str, target: str) -> str:
    parts = name.split(".")
    return ".".join(target if part == source and i > 0 and parts[i - 1] in ADAPTER_CONTAINERS else part
                    for i, part in enumerate(parts))


def copy_adapter(model, source: str, target: str) -> None:
    """Add adapter ``target`` with ``source``'s config and weights, and make it the active one."""
    if target in model.peft_config:
        raise ValueError(f"copy_to: the model already has an adapter named {target!r}; choose another name")
    model.add_adapter(target, copy.deepcopy(model.peft_config[source]))
    copies = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in adapter_parameters(model, source):
            copies[_renamed(name, source, target)].copy_(param)
    model.set_adapter(target)
