"""Saving and loading an S3TModel: adapters in PEFT's layout, heads and registry beside them.

Layout of a saved directory::

    s3t.json                     format version, S3TConfig, blocks, base fingerprint, registry
    heads.safetensors            head snapshots, "<snapshot>/<parameter>"
    adapters/<name>/adapter_config.json, adapter_model.safetensors   (one PEFT adapter per stage)

Only live adapters are written: revoked ones were trained on deleted examples.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch
from peft import LoraConfig
from peft.functional import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

from .config import S3TConfig
from .registry import ProvenanceRegistry

FORMAT = "peft-mape/s3t"
FORMAT_VERSION = 1
META_FILE = "s3t.json"
HEADS_FILE = "heads.safetensors"
ADAPTERS_DIR = "adapters"


def fingerprint(model: nn.Module, exclude) -> str:
    """SHA-256 over the base model's parameters (names, shapes, dtypes, bytes), head excluded."""
    excluded = {id(p) for p in (exclude.values() if isinstance(exclude, dict) else exclude)}
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        if id(param) in excluded or "lora_" in name:
            continue
        data = param.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(data.shape)}|{data.dtype}|".encode())
        digest.update(data.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save(s3t, path: Path) -> Path:
    registry = s3t.registry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        for name in registry.live_adapters():
            adapter_dir = tmp / ADAPTERS_DIR / name
            adapter_dir.mkdir(parents=True)
            s3t.model.peft_config[name].save_pretrained(str(adapter_dir))
            state = get_peft_model_state_dict(s3t.model, adapter_name=name)
            save_file({k: v.contiguous() for k, v in state.items()}, str(adapter_dir / "adapter_model.safetensors"))
        save_file(s3t.heads.flat(), str(tmp / HEADS_FILE))
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": s3t.config.to_dict(),
            "blocks": [list(b) for b in s3t.blocks],
            "base_fingerprint": s3t.base_fingerprint,
            "registry": registry.to_dict(),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load(cls, path: Path, model: nn.Module, *, check_base: bool):
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{path} is not a saved S3TModel (no {META_FILE})")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported format {meta.get('format')!r} v{meta.get('format_version')!r}")
    config = S3TConfig.from_dict(meta["config"])
    s3t = cls(model, config)
    if check_base and s3t.base_fingerprint != meta["base_fingerprint"]:
        raise ValueError(
            "the base model differs from the one these adapters were trained on (fingerprint mismatch); "
            "pass the same base checkpoint, or check_base=False to skip this check"
        )
    if [list(b) for b in s3t.blocks] != meta["blocks"]:
        raise ValueError(f"layer blocks differ: saved {meta['blocks']}, this model gives {s3t.blocks}")
    s3t.registry = ProvenanceRegistry.from_dict(meta["registry"])
    for name in s3t.registry.live_adapters():
        adapter_dir = path / ADAPTERS_DIR / name
        lora = LoraConfig.from_pretrained(str(adapter_dir))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(lora, s3t.model, adapter_name=name)
        result = set_peft_model_state_dict(s3t.model, load_file(str(adapter_dir / "adapter_model.safetensors")),
                                           adapter_name=name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter {name!r}: unexpected saved tensors {unexpected[:5]}")
    # Replaces the snapshots taken from ``model``'s current head, including the initial one.
    s3t.heads.load_flat(load_file(str(path / HEADS_FILE)))
    for param in s3t.model.parameters():
        param.requires_grad_(False)
    s3t.model.eval()
    return s3t


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is swapped out first, then removed."""
    if not target.exists():
        os.replace(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old)
