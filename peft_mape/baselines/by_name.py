"""Run MAPE and every baseline by name, so one benchmark compares them all in one run (SPEC §8).

Names:

- ``"mape-<rule>"``: the mask search, then ``<rule>`` on the selected units (``unlearn()``);
- ``"full-<rule>"``: every head and filter (``selection="all"``): full-parameter SO / GA / ...;
- ``"random-<rule>"``: random units at the same sparsity (``selection="random"``);
- ``"salun-ga"``, ``"salun-graddiff"``: top-k salient weights (:func:`peft_mape.baselines.salun_unlearn`);
  give the budget as ``num_weights=`` (e.g. a MAPE run's ``trainable_parameters``) or ``density=``;
- ``"lora-ga"``, ``"lora-graddiff"``: a LoRA adapter trained with the loss (:func:`peft_mape.baselines.lora_unlearn`).

``<rule>`` is any of ``peft_mape.METHODS`` (so, ga, graddiff, npo, ...). Retraining, the gold
standard, starts from a different model (the initialisation): :func:`peft_mape.baselines.retrain`.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

from .lora import LORA_METHODS, lora_unlearn
from .saliency import SALIENCY_METHODS, salun_unlearn

SELECTIONS = {"mape": None, "full": "all", "random": "random"}


@dataclass
class MethodRun:
    """The unlearned model (for evaluation) and its report as a dict."""

    name: str
    model: Any
    report: dict
    seconds: float


def method_names() -> list[str]:
    """Every name :func:`run_method` accepts."""
    from ..unlearning import METHODS

    names = [f"{family}-{rule}" for family in SELECTIONS for rule in METHODS]
    names += [f"salun-{rule}" for rule in SALIENCY_METHODS]
    names += [f"lora-{rule}" for rule in LORA_METHODS]
    return names


def run_method(name: str, model, forget, retain=None, *, config=None, **kwargs) -> MethodRun:
    """Unlearn ``forget`` from ``model`` with the method called ``name``; see the module docstring.

    ``model`` is modified or wrapped in place — pass ``copy.deepcopy(original)`` to run several
    methods from the same original. ``config`` is the ``MAPEConfig`` of the MAPE families
    (default ``MAPEConfig()``); a "mape-" run may take ``selection=`` (units another run's search
    found). Other keyword arguments go to ``unlearn()`` / the baseline function (``holdout``,
    ``lr``, ``max_steps``, ``seed``, ``progress``, ``sparsity``, ...).
    """
    family, _, rule = name.partition("-")
    if name not in method_names():
        raise ValueError(f"unknown method {name!r}; choose one of {method_names()}")
    clock = time.perf_counter()
    if family in SELECTIONS:
        from peft import get_peft_model

        from ..tuner.config import MAPEConfig

        if family != "mape" and "selection" in kwargs:
            raise ValueError(f"'{name}' fixes its selection ({SELECTIONS[family]!r}); selection= is for 'mape-' runs")
        selection = kwargs.pop("selection", SELECTIONS[family])
        unlearned = get_peft_model(model, copy.deepcopy(config) if config is not None else MAPEConfig())
        report = unlearned.unlearn(forget, retain, method=rule, selection=selection, **kwargs).to_dict()
    elif config is not None:
        raise ValueError(f"config= configures the MAPE families, not '{name}'")
    elif family == "salun":
        unlearned = model
        report = salun_unlearn(model, forget, retain, method=rule, **kwargs)
    else:
        unlearned, report = lora_unlearn(model, forget, retain, method=rule, **kwargs)
    report["method_name"] = name
    return MethodRun(name=name, model=unlearned, report=report, seconds=time.perf_counter() - clock)
