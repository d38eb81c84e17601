"""Relearning attack (SPEC §8): does a little fine-tuning on part of the forget set bring it back?

An unlearned model that only *hides* the forget set (e.g. a small perturbation of weights that
still encode it) relearns it in a few steps, and the recovery generalises to forget examples
the attacker never used. The attack fine-tunes for ``steps`` steps on one half of the forget set
(the attack half), then measures the forget metrics on the other half (held out from the
attack) and on the whole set. Compare the held-out half's recovery with the same attack on the
retrained model: a model that truly forgot recovers no faster than one that never saw the data.

The steps are the library's one optimisation loop (:func:`peft_mape.common.loop.optimise`) with a
plain descent loss; the model's parameters are restored afterwards (unless ``restore=False``),
so the evaluated model is left exactly as it was, also when the attack fails.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch

from ..common.data import (
    default_per_example_loss, forward_arguments, make_loader, materialise, pad_token_id, to_device, validate_examples,
)
from ..common.modes import eval_mode
from ..common.modes import gradients_only_for
from ..common.loop import Descent, LoopData, optimise

MetricFn = Callable[[torch.nn.Module, object], dict]


def forget_set_metrics(model, loader, loss_fn=None, *, device=None) -> dict[str, float]:
    """Mean per-example loss and, for classifiers (logits [B, C]), accuracy over ``loader``."""
    device = device or next(model.parameters()).device
    total, correct, count, classifier = 0.0, 0, 0, True
    with torch.no_grad(), eval_mode(model):
        for batch in loader:
            batch = to_device(batch, device)
            outputs = model(**batch)
            losses = (loss_fn or default_per_example_loss)(outputs, batch)
            total += float(losses.sum())
            count += losses.numel()
            logits = getattr(outputs, "logits", None)
            if logits is not None and logits.dim() == 2 and logits.shape[-1] > 1 and "labels" in batch:
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
            else:
                classifier = False
    metrics = {"loss": total / max(count, 1)}
    if classifier and count:
        metrics["acc"] = correct / count
    return metrics


@dataclass
class RelearningResult:
    """Forget metrics before and after the attack, on the held-out half and on the whole set."""

    steps: int
    lr: float
    attack_examples: int
    heldout_examples: int
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    seconds: float

    def recovery(self, part: str = "heldout", metric: str = "loss") -> float:
        """after - before of ``metric`` on ``part`` (a negative loss change = relearning)."""
        return self.after[part][metric] - self.before[part][metric]

    def to_dict(self) -> dict:
        return asdict(self)


def split_forget_set(examples: Sequence, seed: int = 0) -> tuple[list, list]:
    """A seeded random split into (attack half, held-out half); the held-out half gets the odd one."""
    if len(examples) < 2:
        raise ValueError(f"the relearning attack needs at least 2 forget examples (one per half), got {len(examples)}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    half = len(examples) // 2
    return [examples[i] for i in order[:half]], [examples[i] for i in order[half:]]


def relearning_attack(model, forget, *, steps: int = 5, lr: float = 1e-4, batch_size: int = 8,
                      params: Optional[Sequence[torch.nn.Parameter]] = None, metrics: Optional[MetricFn] = None,
                      loss_fn=None, seed: int = 0, restore: bool = True) -> RelearningResult:
    """Fine-tune ``steps`` steps on half of ``forget``; report forget metrics before and after.

    Args:
        model: the model under attack (a transformers model or a PeftModel).
        forget: the forget set (``datasets.Dataset``, torch Dataset of model-ready dicts, list of
            such dicts, or a DataLoader of dict batches).
        steps, lr, batch_size: the attacker's budget (Adam, gradient norm clipped at 1).
        params: the parameters the attacker tunes; default every floating-point parameter
            (full fine-tuning of the deployed model, adapters included).
        metrics: ``metrics(model, loader) -> dict`` measured on each part; default mean loss and
            (for classifiers) accuracy, see :func:`forget_set_metrics`.
        restore: put the parameters back afterwards (default). Costs one copy of ``params``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = next(model.parameters()).device
    examples = materialise(forget, forward_arguments(model), what="forget")
    validate_examples(examples, "forget", needs_labels=loss_fn is None, model=model)
    attack, heldout = split_forget_set(examples, seed)
    pad = pad_token_id(model)
    loaders = {"heldout": make_loader(heldout, batch_size, pad), "all": make_loader(examples, batch_size, pad)}
    attack_loader = make_loader(attack, batch_size, pad, shuffle=True, seed=seed)
    evaluate = metrics or (lambda m, loader: forget_set_metrics(m, loader, loss_fn, device=device))

    before = {part: evaluate(model, loader) for part, loader in loaders.items()}
    tuned = [p for p in (params if params is not None else model.parameters()) if p.is_floating_point()]
    if not tuned:
        raise ValueError("the relearning attack has no floating-point parameters to tune")
    saved = [p.detach().clone() for p in tuned] if restore else None
    clock = time.perf_counter()
    try:
        with gradients_only_for(model, tuned):  # gradients only where the attacker tunes
            torch.manual_seed(seed)
            loop = optimise(model, tuned, Descent(max_steps=steps), LoopData(
                forget=attack_loader, loss_fn=loss_fn, device=device, progress=False), lr=lr)
        after = {part: evaluate(model, loader) for part, loader in loaders.items()}
    finally:
        if saved is not None:
            with torch.no_grad():
                for p, value in zip(tuned, saved):
                    p.copy_(value)
    return RelearningResult(steps=loop.steps, lr=lr, attack_examples=len(attack), heldout_examples=len(heldout),
                            before=before, after=after, seconds=time.perf_counter() - clock)
