"""The ``peft-mape`` command line (``python -m peft_mape``): unlearn, evaluate, inspect."""

from .app import build_parser, main

__all__ = ["main", "build_parser"]
