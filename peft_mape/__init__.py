"""peft-mape: module-aware parameter-efficient machine unlearning (MAPE-Unlearn) for PEFT.

``import peft_mape`` adds ``PeftType.MAPE`` and registers :class:`MAPEConfig` /
:class:`MAPEModel`, so ``get_peft_model(model, MAPEConfig())`` returns a PeftModel whose
``unlearn(forget, retain)`` erases the forget set by updating only a few attention heads and
FFN filters, and whose adapters save and load like any PEFT adapter. Nothing in PEFT is
replaced: MAPE's saving and loading go through PEFT's own tuner and config hooks.
"""

from .common.distributed import gathered_state_dict, is_main_process
from .tuner.config import MAPEConfig
from .tuner.layer import MAPELayer
from .tuner.model import MAPEModel
from .tuner.registration import ensure_peft_type, register_mape
from .unlearning.report import UnlearnReport
from .unlearning.successive import RequestLog, load_requests
from . import methods
from .unlearning import DEFAULT_METHOD, METHODS, unlearn

register_mape(MAPEConfig, MAPEModel)


def __getattr__(name):
    # UnlearningTrainer imports transformers.Trainer (and through it accelerate): only on use.
    if name == "UnlearningTrainer":
        from .trainer import UnlearningTrainer

        return UnlearningTrainer
    raise AttributeError(f"module 'peft_mape' has no attribute {name!r}")


__all__ = ["MAPEConfig", "MAPEModel", "MAPELayer", "UnlearnReport", "RequestLog", "load_requests", "METHODS",
           "DEFAULT_METHOD", "ensure_peft_type", "gathered_state_dict", "is_main_process", "methods", "unlearn", "UnlearningTrainer"]
__version__ = "0.1.0"
