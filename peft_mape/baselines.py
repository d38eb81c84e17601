"""Baselines that MAPE is compared with (SPEC §8), through the library's one optimisation loop.

- :func:`salun_unlearn` — *module-oblivious weight saliency* (SalUn-style, Fan et al. 2024): the
  gradient of the forget loss ranks individual weights, the top-k |gradient| weights across the
  network (k = MAPE's budget in parameters) are updated with GA or GradDiff, everything else is
  frozen by gradient masks. It tests whether MAPE's unit structure matters at equal budget.
- :func:`lora_unlearn` — *LoRA-restricted* GA / GradDiff: a fresh ``peft.LoraConfig`` adapter on
  the same projections MAPE wraps, trained with the unlearning loss.
- :func:`retrain` — the gold standard: fine-tune the model's initialisation on the retain data.

Full-parameter SO / GA / GradDiff / NPO and random units at equal sparsity are MAPE itself with
``unlearn(selection="all")`` / ``unlearn(selection="random")``; :mod:`peft_mape.compare` runs
every method by name. Every function here returns a report dict with the same loss fields as
:class:`peft_mape.UnlearnReport` and ``seconds`` per phase.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .architectures import resolve_architecture
from .data import (
    MIN_EVAL_BATCH_SIZE, drop_overlap, forward_arguments, make_eval_loader, make_loader, materialise, per_example_losses,
    to_device, validate_examples,
)
from .evaluation.relearning import Descent
from .statistics import eval_mode
from .updates import GradDiff, GradientAscent, UpdateLoss, mean_loss, optimise

SALIENCY_METHODS = ("ga", "graddiff")
LORA_METHODS = ("ga", "graddiff")
# Sparse / low-rank updates, like MAPE's selected units: the masked-update learning rate.
DEFAULT_LR = 2e-4
DEFAULT_MAX_STEPS = 100
MAX_RETAIN_EXAMPLES = 1024  # as MAPEConfig.max_retain_examples: cost independent of |D_r|
REPORT_RETAIN = 256


@dataclass
class _Data:
    """Loaders shared by the baselines, built like ``unlearn()`` builds them."""

    forget: torch.utils.data.DataLoader
    forget_eval: torch.utils.data.DataLoader  # the forget set batched for no-grad loss passes
    train: Optional[torch.utils.data.DataLoader]  # shuffled retain batches for the loop
    report: Optional[torch.utils.data.DataLoader]  # fixed retain prefix for before/after losses
    num_forget: int
    num_retain: int
    target: Optional[float]


def _prepare(model, forget, retain, holdout, *, forget_loss_target, batch_size, seed, loss_fn, device,
             max_retain_examples: int = MAX_RETAIN_EXAMPLES) -> _Data:
    allowed = forward_arguments(model)
    needs_labels = loss_fn is None
    forget_examples = materialise(forget, allowed, what="forget")
    validate_examples(forget_examples, "forget", needs_labels, model=model)
    retain_examples = materialise(retain, allowed, limit=max_retain_examples, seed=seed, what="retain")
    if retain_examples:
        validate_examples(retain_examples, "retain", needs_labels, model=model)
        retain_examples = drop_overlap(retain_examples, forget_examples)  # as unlearn() does, with a warning
    pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    eval_batch_size = max(batch_size, MIN_EVAL_BATCH_SIZE)  # as unlearn()'s default
    target = forget_loss_target
    if target is None and holdout is not None:
        holdout_examples = materialise(holdout, allowed, limit=max_retain_examples, seed=seed, what="holdout")
        validate_examples(holdout_examples, "holdout", needs_labels, model=model)
        target = mean_loss(model, make_eval_loader(holdout_examples, eval_batch_size, pad), loss_fn, device=device)
    return _Data(
        forget=make_loader(forget_examples, batch_size, pad),
        forget_eval=make_eval_loader(forget_examples, eval_batch_size, pad),
        train=make_loader(retain_examples, batch_size, pad, shuffle=True, seed=seed) if retain_examples else None,
        report=make_eval_loader(retain_examples[:REPORT_RETAIN], eval_batch_size, pad) if retain_examples else None,
        num_forget=len(forget_examples), num_retain=len(retain_examples), target=target,
    )


def _update_loss(method: str, choices, retain_weight: float, data: _Data) -> UpdateLoss:
    if method not in choices:
        raise ValueError(f"unknown method {method!r} for this baseline; choose one of {list(choices)}")
    if method == "graddiff" and data.train is None:
        raise ValueError("method 'graddiff' needs a non-empty retain set")
    return GradientAscent() if method == "ga" else GradDiff(retain_weight=retain_weight)


def _losses(model, data: _Data, loss_fn, device) -> tuple[float, Optional[float]]:
    forget = mean_loss(model, data.forget_eval, loss_fn, device=device)
    retain = mean_loss(model, data.report, loss_fn, device=device) if data.report is not None else None
    return forget, retain


def _device(model, device):
    return device if device is not None else next(model.parameters()).device


# --------------------------------------------------------------------------- weight saliency


def saliency_candidates(model, candidates: str = "projections") -> dict[str, torch.nn.Parameter]:
    """The weights the saliency baseline may select, by parameter name.

    ``"projections"`` (default): weights and biases of the attention and FFN projections MAPE
    wraps (the pool of MAPE with ``selection="all"``), so both compete for the same weights.
    ``"all"``: every floating-point parameter (embeddings, norms and the head included).
    """
    named = dict(model.named_parameters())
    if candidates == "all":
        return {n: p for n, p in named.items() if p.is_floating_point()}
    if candidates != "projections":
        raise ValueError(f"candidates must be 'projections' or 'all', got {candidates!r}")
    modules = resolve_architecture(model, None).roles()
    chosen = {n: p for n, p in named.items() if n.rsplit(".", 1)[0] in modules}
    if not chosen:
        raise ValueError("no projection weights found; pass candidates='all'")
    return chosen


def weight_saliency_mask(model, forget_loader, num_weights: int, *, candidates: str = "projections", loss_fn=None,
                         device=None) -> dict[str, torch.Tensor]:
    """Boolean masks (one per candidate parameter) with exactly ``num_weights`` True in total.

    The selected weights have the largest |sum over the forget set of d loss / d weight|, ranked
    jointly across the network (module-oblivious). One backward pass per forget batch, dropout
    off; the model's weights, gradients and requires_grad flags are left as they were.
    """
    device = _device(model, device)
    pool = saliency_candidates(model, candidates)
    total = sum(p.numel() for p in pool.values())
    if not 1 <= num_weights <= total:
        raise ValueError(f"num_weights must be between 1 and the {total:,} candidate weights, got {num_weights}")
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in pool.items()}
    try:
        for p in params:
            p.requires_grad_(False)
        for p in pool.values():
            p.requires_grad_(True)
        with eval_mode(model):
            for batch in forget_loader:
                batch = to_device(batch, device)
                values = torch.autograd.grad(per_example_losses(model, batch, loss_fn).sum(), list(pool.values()),
                                             allow_unused=True)
                for name, g in zip(pool, values):
                    if g is not None:
                        grads[name] += g.float()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    flat = torch.cat([g.abs().reshape(-1) for g in grads.values()])
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[torch.topk(flat, num_weights, sorted=False).indices] = True
    masks, start = {}, 0
    for name, g in grads.items():
        masks[name] = chosen[start:start + g.numel()].view(g.shape)
        start += g.numel()
    return masks


def salun_unlearn(model, forget, retain=None, *, num_weights: Optional[int] = None, density: Optional[float] = None,
                  method: str = "graddiff", candidates: str = "projections", holdout=None,
                  forget_loss_target: Optional[float] = None, lr: float = DEFAULT_LR,
                  max_steps: int = DEFAULT_MAX_STEPS, retain_weight: float = 1.0, batch_size: int = 16, seed: int = 0,
                  loss_fn=None, device=None, progress: bool = False) -> dict:
    """Weight-saliency unlearning: GA/GradDiff on the top-k salient weights only.

    The budget is ``num_weights`` (e.g. a MAPE report's ``trainable_parameters``, for equal
    budgets) or ``density`` (a fraction of the candidate weights). This **modifies the model's
    weights in place** (pass ``copy.deepcopy(model)`` to keep the original); if anything raises,
    the selected weights are restored to their previous values. Gradients of unselected weights
    are zeroed by hooks, and Adam (no weight decay) leaves weights with zero gradients exactly
    unchanged, so only the selected weights move.
    """
    if (num_weights is None) == (density is None):
        raise ValueError("pass exactly one of num_weights= or density=")
    device = _device(model, device)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    data = _prepare(model, forget, retain, holdout, forget_loss_target=forget_loss_target, batch_size=batch_size,
                    seed=seed, loss_fn=loss_fn, device=device)
    update_loss = _update_loss(method, SALIENCY_METHODS, retain_weight, data)
    forget_before, retain_before = _losses(model, data, loss_fn, device)
    seconds["data"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if density is not None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        pool_size = sum(p.numel() for p in saliency_candidates(model, candidates).values())
        num_weights = max(1, round(density * pool_size))
    masks = weight_saliency_mask(model, data.forget, int(num_weights), candidates=candidates, loss_fn=loss_fn,
                                 device=device)
    seconds["saliency"] = time.perf_counter() - clock

    named = dict(model.named_parameters())
    selected = {n: m for n, m in masks.items() if m.any()}
    originals = {n: named[n].detach()[m].clone() for n, m in selected.items()}
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    hooks = []
    clock = time.perf_counter()
    try:
        for p in params:
            p.requires_grad_(False)
        for n, m in selected.items():
            named[n].requires_grad_(True)
            hooks.append(named[n].register_hook(lambda g, m=m: g * m.to(g.dtype)))
        torch.manual_seed(seed)
        loop = optimise(model, [named[n] for n in selected], update_loss, data.forget, data.train, device=device,
                        loss_fn=loss_fn, lr=lr, max_steps=max_steps, forget_loss_target=data.target,
                        progress=progress, initial_forget_loss=forget_before, check_loader=data.forget_eval)
    except BaseException:
        with torch.no_grad():
            for n, m in selected.items():
                named[n][m] = originals[n]
        raise
    finally:
        for hook in hooks:
            hook.remove()
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    seconds["update"] = time.perf_counter() - clock

    clock = time.perf_counter()
    forget_after, retain_after = _losses(model, data, loss_fn, device)
    seconds["evaluation"] = time.perf_counter() - clock
    with torch.no_grad():
        update_norm = math.sqrt(sum(float((named[n][m] - originals[n]).double().pow(2).sum())
                                    for n, m in selected.items()))
    return {
        "method": f"salun-{method}", "num_forget": data.num_forget, "num_retain": data.num_retain,
        "trainable_parameters": int(num_weights), "candidates": candidates,
        "selected_per_parameter": {n: int(m.sum()) for n, m in selected.items()},
        "forget_loss_before": forget_before, "forget_loss_after": forget_after,
        "retain_loss_before": retain_before, "retain_loss_after": retain_after, "update_norm": update_norm,
        "steps": loop.steps, "stopped_early": loop.stopped_early, "forget_loss_target": data.target,
        "hyperparameters": {"lr": lr, "max_steps": max_steps, "batch_size": batch_size, "seed": seed,
                            "retain_weight": retain_weight if method == "graddiff" else None},
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- LoRA


def default_lora_config(model, r: int = 8):
    """LoRA (rank ``r``, alpha 2r, no dropout) on every projection MAPE wraps, for a like-for-like pool."""
    from peft import LoraConfig

    targets = sorted(resolve_architecture(model, None).roles())
    modules = dict(model.named_modules())
    # transformers' Conv1D (GPT-2) stores weights [in, out]; LoRA must know.
    conv1d = any(type(modules[name]).__name__ == "Conv1D" for name in targets)
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=conv1d)


def lora_unlearn(model, forget, retain=None, *, method: str = "ga", lora_config=None, holdout=None,
                 forget_loss_target: Optional[float] = None, lr: float = DEFAULT_LR,
                 max_steps: int = DEFAULT_MAX_STEPS, retain_weight: float = 1.0, batch_size: int = 16, seed: int = 0,
                 loss_fn=None, device=None, progress: bool = False):
    """LoRA-restricted unlearning: train a fresh LoRA adapter with the GA (or GradDiff) loss.

    Returns ``(peft_model, report)``. ``model`` (a plain transformers model) is wrapped in place
    by ``peft.get_peft_model``; ``peft_model.disable_adapter()`` gives the original outputs back,
    ``peft_model.unload()`` the original modules. On failure the LoRA layers are unloaded again.
    """
    from peft import get_peft_model

    device = _device(model, device)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    data = _prepare(model, forget, retain, holdout, forget_loss_target=forget_loss_target, batch_size=batch_size,
                    seed=seed, loss_fn=loss_fn, device=device)
    update_loss = _update_loss(method, LORA_METHODS, retain_weight, data)
    forget_before, retain_before = _losses(model, data, loss_fn, device)
    seconds["data"] = time.perf_counter() - clock

    config = lora_config or default_lora_config(model)
    torch.manual_seed(seed)  # LoRA A is randomly initialised
    peft_model = get_peft_model(model, config)
    clock = time.perf_counter()
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        loop = optimise(peft_model, params, update_loss, data.forget, data.train, device=device, loss_fn=loss_fn,
                        lr=lr, max_steps=max_steps, forget_loss_target=data.target, progress=progress,
                        initial_forget_loss=forget_before, check_loader=data.forget_eval)
    except BaseException:
        peft_model.unload()
        raise
    seconds["update"] = time.perf_counter() - clock
    clock = time.perf_counter()
    forget_after, retain_after = _losses(peft_model, data, loss_fn, device)
    seconds["evaluation"] = time.perf_counter() - clock
    return peft_model, {
        "method": f"lora-{method}", "num_forget": data.num_forget, "num_retain": data.num_retain,
        "trainable_parameters": sum(p.numel() for p in params), "lora_rank": config.r,
        "forget_loss_before": forget_before, "forget_loss_after": forget_after,
        "retain_loss_before": retain_before, "retain_loss_after": retain_after,
        "steps": loop.steps, "stopped_early": loop.stopped_early, "forget_loss_target": data.target,
        "hyperparameters": {"lr": lr, "max_steps": max_steps, "batch_size": batch_size, "seed": seed,
                            "retain_weight": retain_weight if method == "graddiff" else None},
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- retraining


def retrain(model, retain, *, epochs: int = 3, lr: float = 1e-4, batch_size: int = 32, seed: int = 0,
            loss_fn=None, device=None, progress: bool = False) -> dict:
    """The gold standard: train ``model`` (the *initialisation* the original was fine-tuned from,
    e.g. the pretrained checkpoint) on the retain data only, in place.

    ``epochs`` passes of Adam descent through the library's loop, in evaluation mode (dropout
    off) with gradient clipping at 1 and the batch order of the first epoch repeated. Match the
    original training recipe when it matters (e.g. the demo retrains with its own fine-tuning
    code); this function gives every benchmark a retrain row through the same API.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    device = _device(model, device)
    examples = materialise(retain, forward_arguments(model), what="retain")
    validate_examples(examples, "retain", needs_labels=loss_fn is None, model=model)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    loader = make_loader(examples, batch_size, pad, shuffle=True, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("retrain: the model has no trainable parameters (requires_grad is False everywhere)")
    clock = time.perf_counter()
    torch.manual_seed(seed)
    loop = optimise(model, params, Descent(), loader, device=device, loss_fn=loss_fn, lr=lr,
                    max_steps=epochs * len(loader), progress=progress)
    return {"method": "retrain", "num_retain": len(examples), "steps": loop.steps,
            "trainable_parameters": sum(p.numel() for p in params),
            "hyperparameters": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed},
            "seconds": {"update": time.perf_counter() - clock}}
