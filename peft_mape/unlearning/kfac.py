"""Kronecker-factored curvature (K-FAC, with EK-FAC's eigenvalue correction) of the parameters
of ``nn.Linear`` modules, and its damped inverse.

The matrix-free solvers of :mod:`peft_mape.unlearning.hessian` pay two forward-backward passes
over their Hessian sample per iteration, so a user can afford a sample of a few dozen examples
and ten iterations; the directions such a sample sees barely curved (most of them, for a LoRA
adapter) are then inverted at the damping alone, and the influence step is long in directions
the full training set would curve strongly. K-FAC instead estimates the curvature of each
Linear module's weight as a Kronecker product of two small covariances (of the module's inputs
a and of the loss gradients g at its outputs), which one pass over many examples measures and
whose inverse is exact and nearly free in the factors' eigenbases (Martens & Grosse 2015).
EK-FAC (George et al. 2018) keeps those eigenbases but replaces the product of the factors'
eigenvalues by the measured second moment of the per-example gradients in that basis, which
fixes the scale K-FAC gets wrong when a module is applied at many positions (tokens) of one
example; here the factors come from the first half of the sample and the corrected eigenvalues
from the second, so the two cost one pass between them.

The curvature is the Fisher of the model's own predictive distribution (labels sampled from it,
seeded), which equals the Gauss-Newton matrix of cross-entropy in expectation and, like it, is
positive semi-definite. For a causal LM each example's sampled loss is its token sum divided by
the square root of its token count, so that the outer product of its gradient has the Gauss-
Newton matrix of the token-mean loss as its expectation. Parameters are blocks: cross-module
(and lora_A / lora_B) couplings are dropped, which the damping and the caller's step control
have to absorb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..common.data import to_device
from ..common.distributed import RowShard, refuse_sharded, sum_across, sum_count
from ..common.modes import eval_mode

Vector = list[torch.Tensor]


@dataclass
class _Block:
    """One Linear module's weight (and bias, as an extra input column) with its factors."""

    module: torch.nn.Linear
    weight_index: int
    bias_index: Optional[int]
    inputs_cov: Optional[torch.Tensor] = None  # E[a a^T], a with a trailing 1 when the bias is a parameter
    grads_cov: Optional[torch.Tensor] = None  # E[g g^T]
    basis_in: Optional[torch.Tensor] = None
    basis_out: Optional[torch.Tensor] = None
    eigenvalues: Optional[torch.Tensor] = None  # [out, in(+1)]: curvature along basis_out[:, i] x basis_in[:, j]

    def to_matrix(self, vector: Vector) -> torch.Tensor:
        weight = vector[self.weight_index].double()
        if self.bias_index is None:
            return weight
        return torch.cat([weight, vector[self.bias_index].double().unsqueeze(1)], 1)

    def from_matrix(self, matrix: torch.Tensor, out: Vector, like: Sequence[torch.Tensor]) -> None:
        if self.bias_index is None:
            out[self.weight_index] = matrix.to(like[self.weight_index].dtype)
            return
        out[self.weight_index] = matrix[:, :-1].to(like[self.weight_index].dtype)
        out[self.bias_index] = matrix[:, -1].to(like[self.bias_index].dtype)


def linear_blocks(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> list[_Block]:
    """The Linear modules that own ``params``; a ValueError naming any parameter that is not a
    Linear module's weight or bias (K-FAC has no factorisation for it) or a bias whose weight is
    not among ``params``."""
    index = {id(p): i for i, p in enumerate(params)}
    blocks, covered = [], set()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or id(module.weight) not in index:
            continue
        bias = module.bias if module.bias is not None and id(module.bias) in index else None
        blocks.append(_Block(module, index[id(module.weight)], None if bias is None else index[id(bias)]))
        covered.update({id(module.weight)} | ({id(bias)} if bias is not None else set()))
    missing = [name for name, p in model.named_parameters() if id(p) in index and id(p) not in covered]
    if missing:
        raise ValueError(f"curvature='kfac' factorises the weights (and biases) of nn.Linear modules only; "
                         f"{missing[:5]}{' ...' if len(missing) > 5 else ''} are not; use curvature='gauss-newton'")
    return blocks


def sampled_label_losses(logits: torch.Tensor, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Per-example losses of labels drawn from the model's own predictive distribution, scaled so
    that E[grad grad^T] is the Gauss-Newton matrix of the default per-example loss."""
    logits = logits.float()
    labels = batch["labels"]
    if logits.dim() == 2 and logits.shape[-1] == 1:  # MSE: Gauss-Newton 2 J^T J, noise variance 1/2
        noise = torch.randn(logits.shape[0], generator=generator, device=logits.device) * math.sqrt(0.5)
        target = (logits.squeeze(-1) + noise).detach()
        return (logits.squeeze(-1) - target) ** 2
    if logits.dim() == 2:
        probs = logits.detach().softmax(-1)
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return F.cross_entropy(logits, drawn, reduction="none")
    if logits.dim() == 3 and labels.dim() == 2:
        scored = labels[:, 1:] != -100
        shifted = logits[:, :-1]
        probs = shifted.detach()[scored].softmax(-1)
        drawn = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        token_losses = torch.zeros(scored.shape, dtype=logits.dtype, device=logits.device)
        token_losses[scored] = F.cross_entropy(shifted[scored], drawn, reduction="none")
        counts = scored.sum(1).clamp(min=1).to(logits.dtype)
        return token_losses.sum(1) / counts.sqrt()
    raise ValueError(f"curvature='kfac' cannot sample labels for logits of shape {tuple(logits.shape)} and labels of "
                     f"shape {tuple(labels.shape)}; use curvature='gauss-newton' with a loss_fn")


class KFACCurvature:
    """The (E)K-FAC estimate of the Fisher of the mean per-example loss over a sample, for the
    parameters ``params`` (weights and biases of Linear modules), with an exact damped inverse."""

    def __init__(self, model, params: Sequence[torch.Tensor], batches, *, device, correct_eigenvalues: bool = True,
                 seed: int = 0, progress: bool = True):
        refuse_sharded(model, "the K-FAC curvature")
        self.blocks = linear_blocks(model, list(params))
        batches = list(batches)
        if not batches:
            raise ValueError("the K-FAC curvature needs a non-empty sample")
        generator = torch.Generator(device=device).manual_seed(seed)
        split = (len(batches) + 1) // 2 if correct_eigenvalues and len(batches) > 1 else len(batches)
        with eval_mode(model):
            self._factors(model, batches[:split], device, generator, progress)
            for block in self.blocks:
                values_in, block.basis_in = torch.linalg.eigh(block.inputs_cov)
                values_out, block.basis_out = torch.linalg.eigh(block.grads_cov)
                block.eigenvalues = torch.outer(values_out.clamp(min=0), values_in.clamp(min=0))
            if correct_eigenvalues:
                self._correct(model, batches[split:] or batches, device, generator, progress)

    def _passes(self, model, batches, device, generator, progress, desc):
        """Yield (block index, block, inputs a [.., in(+1)], output gradients g [.., out], token mask
        or None) per block
        and batch: one forward pass with sampled labels and one backward to the modules' outputs."""
        captured = {}

        def hook(module, inputs, output):
            captured[module] = (inputs[0], output)

        handles = [block.module.register_forward_hook(hook) for block in self.blocks]
        try:
            for batch in tqdm(RowShard(batches), desc=desc, disable=not progress, leave=False):
                batch = to_device(batch, device)
                captured.clear()
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                losses = sampled_label_losses(logits, batch, generator)
                outputs = [captured[block.module][1] for block in self.blocks]
                grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
                mask = batch.get("attention_mask")
                for i, (block, grad) in enumerate(zip(self.blocks, grads)):
                    a = captured[block.module][0].detach().double()
                    g = torch.zeros_like(outputs[i], dtype=torch.float64) if grad is None else grad.detach().double()
                    if block.bias_index is not None:
                        a = torch.cat([a, torch.ones_like(a[..., :1])], -1)
                    tokens = mask if mask is not None and a.dim() == 3 and tuple(mask.shape) == tuple(a.shape[:2]) \
                        else None
                    yield i, block, a, g, tokens
        finally:
            for handle in handles:
                handle.remove()

    def _factors(self, model, batches, device, generator, progress):
        inputs = [torch.zeros(2 * (b.module.in_features + (b.bias_index is not None),), dtype=torch.float64,
                              device=device) for b in self.blocks]
        grads = [torch.zeros(2 * (b.module.out_features,), dtype=torch.float64, device=device) for b in self.blocks]
        # positions each block saw, then the examples: summed over the ranks with the factors
        counts = torch.zeros(len(self.blocks) + 1, dtype=torch.float64, device=device)
        for i, block, a, g, tokens in self._passes(model, batches, device, generator, progress, "K-FAC factors"):
            if i == 0:
                counts[-1] += a.shape[0]
            if tokens is not None:
                keep = tokens.bool()
                a, g = a[keep], g[keep]
            a, g = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
            inputs[i] += a.T @ a
            grads[i] += g.T @ g
            counts[i] += a.shape[0]
        sum_across(inputs + grads + [counts])
        counts = counts.clamp(min=1)
        for i, block in enumerate(self.blocks):
            # K-FAC "expand" scaling: inputs averaged over positions, gradients summed over an
            # example's positions and averaged over examples, so A (x) G is a per-example moment.
            block.inputs_cov = inputs[i] / counts[i]
            block.grads_cov = grads[i] / counts[-1]

    def _correct(self, model, batches, device, generator, progress):
        sums = [torch.zeros_like(block.eigenvalues) for block in self.blocks]
        count = 0
        for i, block, a, g, tokens in self._passes(model, batches, device, generator, progress, "EK-FAC eigenvalues"):
            if tokens is not None:
                a = a * tokens.unsqueeze(-1).to(a.dtype)
            # per-example gradient sum_t g_t a_t^T, rotated into the factors' eigenbases
            per_example = torch.einsum("...o,...i->...oi", g, a)
            if per_example.dim() == 4:
                per_example = per_example.sum(1)
            rotated = block.basis_out.T @ per_example @ block.basis_in
            sums[i] += (rotated**2).sum(0)
            if i == 0:
                count += per_example.shape[0]
        sum_across(sums)
        total = max(sum_count(count), 1)
        for block, summed in zip(self.blocks, sums):
            block.eigenvalues = summed / total

    def _rotated(self, vector: Vector):
        for block in self.blocks:
            yield block, block.basis_out.T @ block.to_matrix(vector) @ block.basis_in

    def quadratic(self, vector: Vector) -> float:
        """v^T K v for the K-FAC matrix K."""
        return float(sum((block.eigenvalues * rotated**2).sum() for block, rotated in self._rotated(vector)))

    def solve(self, rhs: Vector, damping: float) -> Vector:
        """(K + damping I)^-1 rhs, exactly, block by block."""
        if damping < 0:
            raise ValueError(f"the damping must be >= 0, got {damping}")
        out: Vector = [torch.zeros_like(r) for r in rhs]
        for block, rotated in self._rotated(rhs):
            scaled = rotated / (block.eigenvalues + damping).clamp(min=1e-300)
            block.from_matrix(block.basis_out @ scaled @ block.basis_in.T, out, rhs)
        return out

    def product(self, vector: Vector) -> Vector:
        """K v."""
        out: Vector = [torch.zeros_like(v) for v in vector]
        for block, rotated in self._rotated(vector):
            block.from_matrix(block.basis_out @ (block.eigenvalues * rotated) @ block.basis_in.T, out, vector)
        return out
