"""Mask search (SPEC §3): which heads and filters may be updated.

Objective **MLR** (default, minimise the retain loss):

Minimise over binary masks m (1 = selected/updatable) the second-order model of the retain loss
    (1-m)^T g_f + 1/2 (1-m)^T F_r (1-m)      s.t. sum(m)/|m| <= 1 - sparsity,
i.e. freeze the set P = {u : m_u = 0} of least cost. Two steps:

1. warm start with the diagonal of F_r: unit score s_u = g_f[u] + F_r[u]/2; select the top
   (1 - sparsity) fraction (per unit type, pooled, or by parameter budget);
2. greedy rearrangement with the block-diagonal F_r of each layer and unit type (Kwon et al.
   2022): the number of frozen units per layer stays fixed; walking the selected units from least
   to most important, each joins P and the member of P whose removal lowers
   J(P) = sum_{u in P} g_f[u] + 1/(2B) ||sum_{u in P} G_r[u]||^2 most leaves it.

Objective **MLF** (maximise the forget loss; pairs with GA-family updates): the same two steps
with the roles of the sets swapped: linear term the signed retain sum g_r, quadratic term the
forget Fisher / per-example forget gradients G_f.

Objective **NORM** (cheap baseline): score = sum over the forget set of |dl/dm_u|; top-k by
score, no rearrangement, no retain statistics needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

UNIT_TYPES = ("heads", "filters")
OBJECTIVES = ("mlr", "mlf", "norm")


@dataclass
class SearchResult:
    """Selected units per type as a [layers, units] bool mask, plus the warm-start scores."""

    masks: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]

    def selection(self) -> dict:
        """JSON-ready ``{"heads": {"0": [...]}, "filters": {...}}`` (layers with no unit omitted)."""
        out = {}
        for kind, mask in self.masks.items():
            out[kind] = {
                str(layer): [int(i) for i in torch.nonzero(row).flatten()]
                for layer, row in enumerate(mask)
                if row.any()
            }
        return out

    def counts(self) -> dict[str, int]:
        return {kind: int(mask.sum()) for kind, mask in self.masks.items()}


def unit_scores(forget_sum: torch.Tensor, retain_fisher: torch.Tensor) -> torch.Tensor:
    """Diagonal (warm-start) importance of each unit: cost of freezing it."""
    return forget_sum + 0.5 * retain_fisher


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k highest scores; ties broken by position, so results are deterministic."""
    flat = scores.flatten()
    order = torch.sort(-flat, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view_as(scores)


def warm_start(scores: dict[str, torch.Tensor], sparsity: float, accounting: str = "per_type",
               unit_params: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Select the top (1 - sparsity) of units under the chosen budget accounting."""
    keep = 1.0 - sparsity
    if accounting == "per_type":
        return {k: _top_k_mask(s, max(1, math.floor(keep * s.numel() + 1e-9))) for k, s in scores.items()}
    kinds = list(scores)
    flat = torch.cat([scores[k].flatten() for k in kinds])
    sizes = [scores[k].numel() for k in kinds]
    if accounting == "pooled":
        chosen = _top_k_mask(flat, max(1, math.floor(keep * flat.numel() + 1e-9)))
    elif accounting == "param_weighted":
        if unit_params is None:
            raise ValueError("param_weighted accounting needs the parameter count of each unit type")
        cost = torch.cat([torch.full((scores[k].numel(),), float(unit_params[k])) for k in kinds])
        budget = keep * float(cost.sum())
        # Greedy knapsack by score per parameter; scores can be negative, so rank the density.
        order = torch.sort(-(flat / cost), stable=True).indices
        chosen = torch.zeros_like(flat, dtype=torch.bool)
        spent = 0.0
        for i in order.tolist():
            if spent + cost[i] <= budget:
                chosen[i] = True
                spent += float(cost[i])
        if not chosen.any():
            chosen[order[0]] = True
    else:
        raise ValueError(f"unknown sparsity accounting {accounting!r}")
    parts = torch.split(chosen, sizes)
    return {k: part.view_as(scores[k]) for k, part in zip(kinds, parts)}


def rearrange_layer(selected: torch.Tensor, forget_sum: torch.Tensor, retain_per_example: torch.Tensor,
                    rounds: int = 1) -> torch.Tensor:
    """One layer's greedy swap. ``selected`` [U] bool, ``forget_sum`` [U], ``retain_per_example`` [B, U]."""
    selected = selected.clone()
    if rounds <= 0 or selected.all() or not selected.any():
        return selected
    g = forget_sum.double()
    G = retain_per_example.double()  # [B, U]
    scale = 1.0 / (2.0 * G.shape[0])
    sq_norms = G.pow(2).sum(0)  # ||G[u]||^2
    for _ in range(rounds):
        frozen = ~selected
        running = G[:, frozen].sum(1)  # sum over P of G[u], a [B] vector
        diag_scores = g + scale * sq_norms
        walk = torch.nonzero(selected).flatten()
        walk = walk[torch.sort(diag_scores[walk], stable=True).indices]  # least important first
        changed = False
        for v in walk.tolist():
            candidate = ~selected
            candidate[v] = True
            total = running + G[:, v]
            members = torch.nonzero(candidate).flatten()
            # J(P' \ {w}) - const = -g[w] + scale * ||total - G[w]||^2; pick the w minimising it.
            residual = -g[members] + scale * (total.dot(total) - 2 * (G[:, members].T @ total) + sq_norms[members])
            w = int(members[torch.argmin(residual)])
            if w != v:
                selected[v] = False
                selected[w] = True
                running = total - G[:, w]
                changed = True
        if not changed:
            break
    return selected


def search_units(forget_per_example: dict[str, torch.Tensor], retain_per_example: dict[str, torch.Tensor] | None, *,
                 sparsity: float, units: str = "both", accounting: str = "per_type", rounds: int = 1,
                 unit_params: dict[str, int] | None = None, objective: str = "mlr") -> SearchResult:
    """Mask search. Inputs are per unit type per-example mask gradients [B, L, U] of each set.

    MLR ranks by the signed forget sum and the retain curvature; MLF swaps the roles of the two
    sets; NORM ranks by the summed absolute forget gradient and ignores ``retain_per_example``.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown mask-search objective {objective!r}; choose one of {list(OBJECTIVES)}")
    kinds = list(UNIT_TYPES) if units == "both" else [units]
    if objective == "norm":
        scores = {k: forget_per_example[k].abs().sum(0) for k in kinds}
        masks = warm_start(scores, sparsity, accounting, unit_params)
        return _complete(SearchResult(masks=masks, scores=scores), forget_per_example)
    if retain_per_example is None:
        raise ValueError(f"objective '{objective}' needs retain statistics; use objective='norm' without a retain set")
    linear_side, curvature_side = (
        (forget_per_example, retain_per_example) if objective == "mlr" else (retain_per_example, forget_per_example)
    )
    linear = {k: linear_side[k].sum(0) for k in kinds}
    fisher = {k: curvature_side[k].pow(2).mean(0) for k in kinds}
    scores = {k: unit_scores(linear[k], fisher[k]) for k in kinds}
    masks = warm_start(scores, sparsity, accounting, unit_params)
    for kind in kinds:
        mask = masks[kind]
        for layer in range(mask.shape[0]):
            mask[layer] = rearrange_layer(mask[layer], linear[kind][layer], curvature_side[kind][:, layer], rounds)
    return _complete(SearchResult(masks=masks, scores=scores), forget_per_example)


def _complete(result: SearchResult, reference: dict[str, torch.Tensor]) -> SearchResult:
    """Add an empty mask for the unit types that were not searched."""
    for kind in UNIT_TYPES:
        if kind not in result.masks:
            result.masks[kind] = torch.zeros(reference[kind].shape[1:], dtype=torch.bool)
    return result


def random_selection(shapes: dict[str, tuple[int, int]], sparsity: float, *, units: str = "both",
                     accounting: str = "per_type", unit_params: dict[str, int] | None = None,
                     seed: int = 0) -> SearchResult:
    """Random units under the same budget as the search: the module-agnostic control (SPEC §8)."""
    generator = torch.Generator().manual_seed(seed)
    kinds = list(UNIT_TYPES) if units == "both" else [units]
    scores = {k: torch.rand(shapes[k], generator=generator) for k in kinds}
    masks = warm_start(scores, sparsity, accounting, unit_params)
    for kind in UNIT_TYPES:
        masks.setdefault(kind, torch.zeros(shapes[kind], dtype=torch.bool))
    return SearchResult(masks=masks, scores={})
