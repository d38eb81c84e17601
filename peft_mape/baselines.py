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
from .data import forward_arguments, make_loader, materialise, pad_token_id, per_example_losses, to_device, \
    validate_examples
from .modes import eval_mode
from .unlearning.loop import Descent, LoopData, mean_loss, optimise
from .unlearning.methods import LoopMethod, resolve_method
from .unlearning.preparation import UnlearningData, holdout_target, prepare
from .unlearning.unlearn import split_options

SALIENCY_METHODS = ("ga", "graddiff")
LORA_METHODS = ("ga", "graddiff")


def _baseline_setup(model, forget, retain, method: str, choices, holdout, forget_loss_target, options: dict):
    """The loop method, the data (prepared exactly as ``unlearn()`` prepares it) and the stopping target."""
    if method not in choices:
        raise ValueError(f"unknown method {method!r} for this baseline; choose one of {list(choices)}")
    options = {"progress": False, **options}
    run, method_options = split_options(method, options)
    loop_method = resolve_method(method, method_options, method)
    data = prepare(model, forget, retain, options=run)
    if loop_method.needs_retain and data.train_loader is None:
        raise ValueError(f"method '{method}' needs a non-empty retain set")
    target = forget_loss_target
    if target is None and holdout is not None:
        target = holdout_target(data, holdout)
    return loop_method, data, target


def _hyperparameters(method: LoopMethod, data: UnlearningData) -> dict:
    return {"seed": data.options.seed, "batch_size": data.batch_size, **method.options(),
            "lr": method.step_size(False)}


def _losses(model, data: UnlearningData) -> tuple[float, Optional[float]]:
    forget = mean_loss(model, data.forget_eval_loader, data.loss_fn, device=data.device)
    retain = mean_loss(model, data.report_loader, data.loss_fn, device=data.device) \
        if data.report_loader is not None else None
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
                  forget_loss_target: Optional[float] = None, **options) -> dict:
    """Weight-saliency unlearning: GA/GradDiff on the top-k salient weights only.

    The budget is ``num_weights`` (e.g. a MAPE report's ``trainable_parameters``, for equal
    budgets) or ``density`` (a fraction of the candidate weights). ``options`` are those of the
    loop method (``lr``, default 2e-4; ``max_steps``, ``retain_weight``, ...) and of the run
    (``seed``, ``batch_size``, ``loss_fn``, ``progress``, default off), as for ``unlearn()``.
    This **modifies the model's weights in place** (pass ``copy.deepcopy(model)`` to keep the
    original); if anything raises, the selected weights are restored to their previous values.
    Gradients of unselected weights are zeroed by hooks, and Adam (no weight decay) leaves
    weights with zero gradients exactly unchanged, so only the selected weights move.
    """
    if (num_weights is None) == (density is None):
        raise ValueError("pass exactly one of num_weights= or density=")
    update_loss, data, target = _baseline_setup(model, forget, retain, method, SALIENCY_METHODS, holdout,
                                                forget_loss_target, options)
    forget_before, retain_before = _losses(model, data)
    seconds = data.timer.seconds
    seed, loss_fn, device = data.options.seed, data.loss_fn, data.device

    clock = time.perf_counter()
    if density is not None:
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        pool_size = sum(p.numel() for p in saliency_candidates(model, candidates).values())
        num_weights = max(1, round(density * pool_size))
    masks = weight_saliency_mask(model, data.forget_loader, int(num_weights), candidates=candidates,
                                 loss_fn=loss_fn, device=device)
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
        loop = optimise(model, [named[n] for n in selected], update_loss, data.loop_data(),
                        lr=update_loss.step_size(False), target=target, initial_forget_loss=forget_before)
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
    forget_after, retain_after = _losses(model, data)
    seconds["evaluation"] = time.perf_counter() - clock
    with torch.no_grad():
        update_norm = math.sqrt(sum(float((named[n][m] - originals[n]).double().pow(2).sum())
                                    for n, m in selected.items()))
    return {
        "method": f"salun-{method}", "num_forget": len(data.forget_examples), "num_retain": len(data.retain_examples),
        "trainable_parameters": int(num_weights), "candidates": candidates,
        "selected_per_parameter": {n: int(m.sum()) for n, m in selected.items()},
        "forget_loss_before": forget_before, "forget_loss_after": forget_after,
        "retain_loss_before": retain_before, "retain_loss_after": retain_after, "update_norm": update_norm,
        "steps": loop.steps, "stopped_early": loop.stopped_early, "forget_loss_target": target,
        "hyperparameters": _hyperparameters(update_loss, data), "seconds": seconds,
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
                 forget_loss_target: Optional[float] = None, **options):
    """LoRA-restricted unlearning: train a fresh LoRA adapter with the GA (or GradDiff) loss.

    Returns ``(peft_model, report)``. ``options`` as for :func:`salun_unlearn`. ``model`` (a plain
    transformers model) is wrapped in place by ``peft.get_peft_model``;
    ``peft_model.disable_adapter()`` gives the original outputs back, ``peft_model.unload()`` the
    original modules. On failure the LoRA layers are unloaded again.
    """
    from peft import get_peft_model

    update_loss, data, target = _baseline_setup(model, forget, retain, method, LORA_METHODS, holdout,
                                                forget_loss_target, options)
    forget_before, retain_before = _losses(model, data)
    seconds, seed = data.timer.seconds, data.options.seed

    config = lora_config or default_lora_config(model)
    torch.manual_seed(seed)  # LoRA A is randomly initialised
    peft_model = get_peft_model(model, config)
    clock = time.perf_counter()
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        loop = optimise(peft_model, params, update_loss, data.loop_data(), lr=update_loss.step_size(False),
                        target=target, initial_forget_loss=forget_before)
    except BaseException:
        peft_model.unload()
        raise
    seconds["update"] = time.perf_counter() - clock
    clock = time.perf_counter()
    forget_after, retain_after = _losses(peft_model, data)
    seconds["evaluation"] = time.perf_counter() - clock
    return peft_model, {
        "method": f"lora-{method}", "num_forget": len(data.forget_examples), "num_retain": len(data.retain_examples),
        "trainable_parameters": sum(p.numel() for p in params), "lora_rank": config.r,
        "forget_loss_before": forget_before, "forget_loss_after": forget_after,
        "retain_loss_before": retain_before, "retain_loss_after": retain_after,
        "steps": loop.steps, "stopped_early": loop.stopped_early, "forget_loss_target": target,
        "hyperparameters": _hyperparameters(update_loss, data), "seconds": seconds,
    }


# --------------------------------------------------------------------------- retraining


def retrain(model, retain, *, epochs: int = 3, lr: float = 1e-4, batch_size: int = 32, seed: int = 0,
            loss_fn=None, progress: bool = False) -> dict:
    """The gold standard: train ``model`` (the *initialisation* the original was fine-tuned from,
    e.g. the pretrained checkpoint) on the retain data only, in place.

    ``epochs`` passes of Adam descent through the library's loop, in evaluation mode (dropout
    off) with gradient clipping at 1 and the batch order of the first epoch repeated. Match the
    original training recipe when it matters (e.g. the demo retrains with its own fine-tuning
    code); this function gives every benchmark a retrain row through the same API.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    examples = materialise(retain, forward_arguments(model), what="retain")
    validate_examples(examples, "retain", needs_labels=loss_fn is None, model=model)
    loader = make_loader(examples, batch_size, pad_token_id(model), shuffle=True, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("retrain: the model has no trainable parameters (requires_grad is False everywhere)")
    clock = time.perf_counter()
    torch.manual_seed(seed)
    loop = optimise(model, params, Descent(max_steps=epochs * len(loader)), LoopData(
        forget=loader, loss_fn=loss_fn, device=next(model.parameters()).device, progress=progress), lr=lr)
    return {"method": "retrain", "num_retain": len(examples), "steps": loop.steps,
            "trainable_parameters": sum(p.numel() for p in params),
            "hyperparameters": {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed},
            "seconds": {"update": time.perf_counter() - clock}}
