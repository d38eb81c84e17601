"""Baselines that MAPE is compared with (SPEC §8), through the same data preparation and the one loop.

Full-parameter SO / GA / GradDiff / NPO and random units at equal sparsity are MAPE itself with
``unlearn(selection="all")`` / ``unlearn(selection="random")``; :mod:`.by_name` runs every method
by name. Every baseline returns a report dict with the same loss fields as
:class:`peft_mape.UnlearnReport` and ``seconds`` per phase.
"""

from .by_name import MethodRun, method_names, run_method
from .lora import LORA_METHODS, default_lora_config, lora_unlearn
from .retrain import retrain
from .saliency import SALIENCY_METHODS, saliency_candidates, salun_unlearn, weight_saliency_mask

__all__ = ["salun_unlearn", "lora_unlearn", "retrain", "weight_saliency_mask", "saliency_candidates",
           "default_lora_config", "SALIENCY_METHODS", "LORA_METHODS", "run_method", "method_names", "MethodRun"]
