"""Saving MAPE adapters through PEFT's own ``save_pretrained``, which this library never replaces.

``PeftModel.save_pretrained`` writes each adapter's weights file and then calls the adapter
config's ``save_pretrained`` (``MAPEConfig.save_pretrained`` → :func:`save_config`). That last
step writes ``adapter_config.json`` with the SHA-256 of the weights file beside it, through a
temporary file and one rename. So a save interrupted after the weights were written leaves the
previous config, whose digest no longer matches, and the loader refuses the pair instead of
loading a silently wrong model. PEFT writes nothing else into the folder except its model card
(which it updates), so tokenizer files, other adapters and ``checkpoint-*`` folders stay.

What successive requests keep travels inside these two files, so no extra file is written:
each request's record is a field of its adapter's config, and the cached retain statistics
are tensors in the weights file of the adapter they were computed for (see
``MAPEModel._get_adapter_state_dict``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

from ..common.files import atomic_write

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def weights_file_digest(directory) -> Optional[str]:
    """Digest of the adapter weights file in ``directory`` (None when there is none)."""
    import torch
    from safetensors.torch import load_file

    from .integrity import tensors_digest

    for name in WEIGHTS_FILES:
        weights = Path(directory) / name
        if weights.is_file():
            tensors = load_file(weights) if name.endswith(".safetensors") else torch.load(weights, weights_only=True)
            return tensors_digest(tensors)
    return None


def save_config(save_directory, write_with_peft, **kwargs) -> None:
    """``write_with_peft(folder, **kwargs)`` (PEFT's config save) into a scratch folder, then
    ``adapter_config.json`` with the weights digest added, moved into ``save_directory`` with
    one rename."""
    directory = Path(save_directory)
    if directory.is_file():
        raise ValueError(f"save_directory {str(directory)!r} is a file; pass a directory")
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".mape-config-", dir=directory) as scratch:
        write_with_peft(scratch, **kwargs)
        payload = json.loads((Path(scratch) / CONFIG_FILE).read_text())
    payload["weights_digest"] = weights_file_digest(directory)
    text = json.dumps(payload, indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(text))
