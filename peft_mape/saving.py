"""Atomic ``save_pretrained`` for models that carry MAPE adapters.

PEFT writes adapter files straight into the target directory, so a crash mid-save can leave a
half-written adapter behind. For MAPE models we write into a temporary sibling directory and
rename it into place; a previous directory of the same name is only removed once the new one
is complete. The request log and cached retain statistics of successive requests are written
into the same directory (see ``requests.py``).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel


def _has_mape(model) -> bool:
    from .config import MAPEConfig

    return any(isinstance(c, MAPEConfig) for c in getattr(model, "peft_config", {}).values())


def atomic_directory_write(write, save_directory) -> None:
    """Run ``write(tmp_dir)`` and move ``tmp_dir`` to ``save_directory`` once it succeeded."""
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(str(tmp))
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def install_atomic_save() -> None:
    """Wrap ``PeftModel.save_pretrained`` once; non-MAPE models keep PEFT's behaviour."""
    original = PeftModel.save_pretrained
    if getattr(original, "_mape_atomic", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if not _has_mape(self) or os.path.isfile(save_directory):
            return original(self, save_directory, *args, **kwargs)
        from .requests import save_request_state

        def write(tmp):
            original(self, tmp, *args, **kwargs)
            save_request_state(self.base_model, tmp)  # request log + cached retain statistics

        atomic_directory_write(write, save_directory)

    save_pretrained._mape_atomic = True
    PeftModel.save_pretrained = save_pretrained
