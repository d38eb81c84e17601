"""One call per task family: the forget / retain / test metrics of SPEC §8 as a flat dict.

Accuracies are fractions in [0, 1]; ``mia_*`` are membership-inference ROC-AUCs of the forget
set against the test (held-out) set, 0.5 = indistinguishable. Flat dicts of floats so that
reports, audit files, plots and tables can use them directly.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from .classification import classifier_outputs
from .language_model import token_log_probs
from .mia import classifier_mia_aucs, language_model_mia_aucs


def classification_metrics(model, forget_loader, test_loader, retain_loader=None, *, device=None,
                           progress: bool = False) -> dict[str, float]:
    """Accuracy and mean loss on forget / test (/ retain), and LOSS / confidence / entropy MIA AUCs."""
    sets = {"forget": forget_loader, "test": test_loader}
    if retain_loader is not None:
        sets["retain"] = retain_loader
    outputs = {
        name: classifier_outputs(model, tqdm(loader, desc=f"evaluate {name}", disable=not progress, leave=False),
                                 device=device)
        for name, loader in sets.items()
    }
    metrics: dict[str, float] = {}
    for name, out in outputs.items():
        metrics[f"{name}_acc"] = out.accuracy
        metrics[f"{name}_loss"] = float(np.mean(out.losses))
    forget, test = outputs["forget"], outputs["test"]
    aucs = classifier_mia_aucs(forget.logits, forget.labels, test.logits, test.labels)
    metrics.update({f"mia_{name}": value for name, value in aucs.items()})
    return metrics


def language_model_metrics(model, forget_loader, test_loader, forget_texts: Sequence[str],
                           test_texts: Sequence[str], retain_loader=None, *, k: float = 0.2, device=None,
                           progress: bool = False) -> dict[str, float]:
    """Mean token NLL and perplexity on forget / test (/ retain), and LOSS / zlib / Min-K% MIA AUCs.

    ``*_texts`` are the raw texts of the loaders' examples, in the same order (for zlib).
    """
    sets = {"forget": forget_loader, "test": test_loader}
    if retain_loader is not None:
        sets["retain"] = retain_loader
    log_probs = {name: token_log_probs(model, loader, device, progress=progress, desc=f"evaluate {name}")
                 for name, loader in sets.items()}
    metrics: dict[str, float] = {}
    for name, rows in log_probs.items():
        nll = float(np.mean([-r.mean() for r in rows]))
        metrics[f"{name}_loss"] = nll
        metrics[f"{name}_perplexity"] = float(np.exp(nll))
    aucs = language_model_mia_aucs(log_probs["forget"], forget_texts, log_probs["test"], test_texts, k=k)
    metrics.update({f"mia_{name}": value for name, value in aucs.items()})
    return metrics


def metric_gaps(metrics: dict[str, float], reference: Optional[dict[str, float]]) -> dict[str, float]:
    """``metrics - reference`` for every key both have (e.g. a method vs the retrained model)."""
    if not reference:
        return {}
    return {k: float(metrics[k]) - float(reference[k]) for k in metrics if k in reference}
