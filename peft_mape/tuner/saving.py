"""Saving MAPE adapters without touching anything else in the folder.

PEFT writes adapter files straight into the target directory, so a crash mid-save can leave a
half-written file behind. For models that carry MAPE adapters, ``save_pretrained`` lets PEFT
write into a hidden staging directory inside the target, then moves each file it wrote into
place with one ``os.replace`` (atomic per file): the weights first, the adapter config last, so
an interrupted save leaves a config whose recorded weight digest no longer matches and the
loader refuses it. Files that PEFT did not write this time — a tokenizer, a model card's own
text, other adapters, ``checkpoint-*`` folders of a Trainer run — are never moved, renamed or
deleted. ``is_main_process=False`` writes nothing, as in PEFT.

The request log and cached retain statistics of successive requests are staged and moved the
same way (see ``peft_mape/unlearning/successive.py``).
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel

STAGING_PREFIX = ".mape-save-"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def _has_mape(model) -> bool:
    from .config import MAPEConfig

    return any(isinstance(c, MAPEConfig) for c in getattr(model, "peft_config", {}).values())


def publish_files(staging: Path, target: Path) -> None:
    """Move every file under ``staging`` to the same relative path under ``target``, one
    ``os.replace`` each; adapter configs go last in each folder."""
    files = sorted((p for p in staging.rglob("*") if p.is_file()),
                   key=lambda p: (p.name == CONFIG_FILE, len(p.relative_to(staging).parts), str(p)))
    for source in files:
        destination = target / source.relative_to(staging)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, destination)


def record_weights_digest(config_path: Path) -> None:
    """Add the digest of the weights file beside a MAPE ``adapter_config.json`` (checked on load)."""
    import torch
    from safetensors.torch import load_file

    from .integrity import tensors_digest

    payload = json.loads(config_path.read_text())
    if payload.get("peft_type") != "MAPE":
        return
    for name in WEIGHTS_FILES:
        weights = config_path.parent / name
        if weights.is_file():
            tensors = load_file(weights) if name.endswith(".safetensors") else torch.load(weights, weights_only=True)
            payload["weights_digest"] = tensors_digest(tensors)
            config_path.write_text(json.dumps(payload, indent=2, sort_keys=True))
            return


def _is_main_process(original, args, kwargs) -> bool:
    bound = inspect.signature(original).bind_partial(None, None, *args, **kwargs)
    return bool(bound.arguments.get("is_main_process", True))


def save_mape_model(model, original, save_directory, *args, **kwargs) -> None:
    """``original(model, staging, ...)`` (PEFT's save) plus the request state, published file by file."""
    if not _is_main_process(original, args, kwargs):
        # Other processes write nothing, but still run PEFT's save: gathering a sharded state
        # dict is collective.
        with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX) as scratch:
            original(model, scratch, *args, **kwargs)
        return
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=target))
    try:
        card = target / "README.md"
        if card.is_file():  # PEFT's model card code updates an existing card instead of replacing it
            shutil.copy2(card, staging / "README.md")
        original(model, str(staging), *args, **kwargs)
        for config_path in staging.rglob(CONFIG_FILE):
            record_weights_digest(config_path)
        model.base_model.requests.save(staging)
        publish_files(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install_atomic_save() -> None:
    """Wrap ``PeftModel.save_pretrained`` once; non-MAPE models keep PEFT's behaviour."""
    original = PeftModel.save_pretrained
    if getattr(original, "_mape_atomic", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _has_mape(self) or os.path.isfile(save_directory):
            return original(self, save_directory, *args, **kwargs)
        return save_mape_model(self, original, save_directory, *args, **kwargs)

    save_pretrained._mape_atomic = True
    PeftModel.save_pretrained = save_pretrained
