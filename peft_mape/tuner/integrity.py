"""Checks that a saved adapter is applied to what it was made for.

- :func:`tensors_digest`: a SHA-256 over the saved tensors (names, dtypes, shapes, bytes). The
  save path records it in ``adapter_config.json``; loading recomputes it, so a corrupt or
  mismatched weights file is an error instead of a silently different model.
- :func:`base_weights_fingerprint`: an unlearning delta is only meaningful on the base weights it
  was computed for, and another fine-tune or seed of the same architecture has the same shapes,
  so shape checks cannot tell. The fingerprint hashes the first two owned slices of every
  projection the adapter touches (cheap whatever the model size) and keeps a few of their values,
  so that a base loaded in another dtype can still be compared, within that dtype's rounding.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Mapping

import torch

from .config import BASE_CHECKS

SLICES_PER_LAYER = 2
SAMPLE_PER_LAYER = 4
# Relative tolerance of the value sample when the base is loaded in another dtype (bf16 keeps ~3 digits).
SAMPLE_RTOL = 2e-2


class BaseModelMismatch(ValueError):
    """The adapter was computed on other base weights than the ones it is loaded onto."""


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's values as stored (any dtype, bf16 included)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over ``tensors`` in key order: names, dtypes, shapes and raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        value = tensors[key]
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(_raw_bytes(value))
    return digest.hexdigest()


def _owned_base_slices(layer, adapter_name: str):
    """The base weight's slices at the first few indices ``adapter_name`` owns in ``layer``, or
    None when not comparable (no delta there, merged, or weights not materialised)."""
    if adapter_name not in layer.mape_index or layer.merged or layer.get_base_layer().weight.is_meta:
        return None
    return layer.owned_base_slices(adapter_name, SLICES_PER_LAYER)[0][2]


def base_weights_fingerprint(tuner, adapter_name: str) -> dict:
    """``{"dtype", "digest", "sample"}`` of the base weights ``adapter_name``'s deltas apply to."""
    digest = hashlib.sha256()
    sample: list[float] = []
    dtype = None
    for name, layer in tuner.mape_layers():
        slices = _owned_base_slices(layer, adapter_name)
        if slices is None:
            continue
        dtype = str(slices.dtype).removeprefix("torch.")
        digest.update(name.encode())
        digest.update(_raw_bytes(slices))
        sample.extend(float(v) for v in slices.reshape(-1)[:SAMPLE_PER_LAYER].float())
    return {"dtype": dtype, "digest": digest.hexdigest(), "sample": sample}


def base_weights_match(tuner, adapter_name: str) -> tuple[bool, str]:
    """Whether the base weights under ``adapter_name`` are the ones its config recorded, and why."""
    recorded = tuner.peft_config[adapter_name].base_fingerprint
    if not recorded:
        return True, "no base fingerprint recorded"
    if any(layer.merged for _, layer in tuner.mape_layers()):
        return True, "not checked: merged adapters change the base weights"
    current = base_weights_fingerprint(tuner, adapter_name)
    if current["dtype"] == recorded.get("dtype"):
        same = current["digest"] == recorded.get("digest")
        return same, "digest of the touched base weights " + ("matches" if same else "differs")
    saved = torch.tensor(recorded.get("sample") or [], dtype=torch.float64)
    now = torch.tensor(current["sample"], dtype=torch.float64)
    same = saved.shape == now.shape and bool(torch.allclose(now, saved, rtol=SAMPLE_RTOL, atol=1e-3))
    return same, (f"base loaded as {current['dtype']}, saved on {recorded.get('dtype')}: sampled values "
                  + ("match within rounding" if same else "differ"))


def check_base_weights(tuner, adapter_name: str, policy: str = "warn") -> bool:
    """Compare the base weights with the adapter's recorded fingerprint; on a mismatch warn
    (``policy="warn"``) or raise :class:`BaseModelMismatch` (``"error"``). Returns whether they match."""
    if policy not in BASE_CHECKS:
        raise ValueError(f"base_model_check must be one of {list(BASE_CHECKS)}, got {policy!r}")
    if policy == "off":
        return True
    same, reason = base_weights_match(tuner, adapter_name)
    if not same:
        message = (f"adapter '{adapter_name}' was computed on other base weights ({reason}): an unlearning delta "
                   "only erases on the model it was computed for. Load it onto the same base checkpoint "
                   "(set base_model_check='error' in its config to make this an error, 'off' to skip the check)")
        if policy == "error":
            raise BaseModelMismatch(message)
        warnings.warn(message, UserWarning, stacklevel=3)
    return same
