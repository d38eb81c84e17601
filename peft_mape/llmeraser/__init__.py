"""LLMEraser: influence edits of LoRA adapters (SPEC §7) — instance removal, query modification,
response correction — without retraining.

    from peft_mape.llmeraser import erase, undo, ResponseCorrection
    report = erase(peft_model, ResponseCorrection(old=wrong, new=fixed), train=train_set)
"""

from .edit import EraseOptions, erase
from .report import EditReport, undo
from .requests import InstanceRemoval, QueryModification, ResponseCorrection

__all__ = ["EditReport", "EraseOptions", "InstanceRemoval", "QueryModification", "ResponseCorrection", "erase",
           "undo"]
