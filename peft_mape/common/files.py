"""Reading and writing the library's small files: atomic writes and JSON reads with clear errors."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path, write: Callable[[str], None]) -> Path:
    """Run ``write(tmp_path)`` on a temporary file beside ``path``, then rename it to ``path``.

    The temporary file is removed when ``write`` fails; ``path`` is then left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path


def read_json(path, missing: str):
    """The JSON content of ``path``; ``FileNotFoundError(missing)`` when it is not a file and a
    ``ValueError`` naming the file when it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
