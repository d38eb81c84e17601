"""K-FAC / EK-FAC curvature of Linear modules (peft_mape.unlearning.kfac).

Pinned where the answer is known: for a linear regression under the MSE loss the Gauss-Newton
matrix is exactly Kronecker (2 E[x x^T] (x) 1), so the estimate must match it up to sampling
noise; the damped inverse must invert the damped product exactly; sequence inputs must count
padded positions out; parameters it cannot factorise must be refused by name.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peft_mape.common.data import make_loader
from peft_mape.unlearning.hessian import gauss_newton_vector_product
from peft_mape.unlearning.kfac import KFACCurvature, linear_blocks


class Regression(nn.Module):
    def __init__(self, dim: int, outputs: int = 1):
        super().__init__()
        self.linear = nn.Linear(dim, outputs)

    def forward(self, pixel_values, labels=None):
        return SimpleNamespace(logits=self.linear(pixel_values))


class TokenClassifier(nn.Module):
    """A Linear applied at every position, then mean-pooled over the attended positions."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, inputs_embeds, attention_mask, labels=None):
        mask = attention_mask.unsqueeze(-1).to(inputs_embeds.dtype)
        pooled = (self.proj(inputs_embeds) * mask).sum(1) / mask.sum(1)
        return SimpleNamespace(logits=self.head(pooled))


def _regression_data(n: int, dim: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.5, 2.0, dim)
    x = torch.randn(n, dim, generator=g) * scales
    return [{"pixel_values": x[i], "labels": torch.randn((), generator=g)} for i in range(n)]


@pytest.mark.parametrize("correct_eigenvalues, tolerance", [(False, 0.05), (True, 0.15)], ids=["kfac", "ekfac"])
def test_kfac_of_a_linear_regression_matches_its_exact_gauss_newton_matrix(correct_eigenvalues, tolerance):
    """EK-FAC's tolerance is wider: each corrected eigenvalue is a mean of heavy-tailed squares
    over half the sample (its error falls to 0.02 at 32,000 examples), where K-FAC's factors
    average the well-behaved inputs."""
    torch.manual_seed(0)
    model = Regression(4)
    params = [model.linear.weight, model.linear.bias]
    examples = _regression_data(4000, 4)
    curvature = KFACCurvature(model, params, make_loader(examples, 200), device="cpu",
                              correct_eigenvalues=correct_eigenvalues, progress=False)
    probe = [torch.randn_like(p) for p in params]
    exact = gauss_newton_vector_product(model, params, list(make_loader(examples, 200)), probe, device="cpu")
    estimated = curvature.product(probe)
    flat = lambda v: torch.cat([t.reshape(-1) for t in v])  # noqa: E731
    relative = float((flat(estimated) - flat(exact)).norm() / flat(exact).norm())
    assert relative < tolerance, relative
    # the scale, not just the direction: v^T K v against v^T G v
    assert abs(curvature.quadratic(probe) / float(flat(probe) @ flat(exact)) - 1) < tolerance


@pytest.mark.parametrize("correct_eigenvalues", [True, False], ids=["ekfac", "kfac"])
def test_the_damped_inverse_inverts_the_damped_product(correct_eigenvalues):
    torch.manual_seed(1)
    model = TokenClassifier(5, 3)
    params = [model.proj.weight, model.head.weight, model.head.bias]
    examples = [{"inputs_embeds": torch.randn(6, 5), "attention_mask": torch.ones(6, dtype=torch.long),
                 "labels": torch.tensor(i % 3)} for i in range(64)]
    curvature = KFACCurvature(model, params, make_loader(examples, 16), device="cpu",
                              correct_eigenvalues=correct_eigenvalues, progress=False)
    v = [torch.randn_like(p) for p in params]
    damping = 0.05
    damped = [k + damping * x for k, x in zip(curvature.product(v), v)]
    back = curvature.solve(damped, damping)
    for original, recovered in zip(v, back):
        torch.testing.assert_close(recovered, original, rtol=1e-4, atol=1e-5)
    assert curvature.quadratic(v) > 0


def test_padded_positions_do_not_enter_the_factors():
    """Padding only appended to an example (masked, so the function is unchanged) must leave the
    input factor unchanged too."""
    torch.manual_seed(2)
    model = TokenClassifier(4, 2)
    params = [model.proj.weight]
    g = torch.Generator().manual_seed(3)
    short = [{"inputs_embeds": torch.randn(3, 4, generator=g), "attention_mask": torch.ones(3, dtype=torch.long),
              "labels": torch.tensor(i % 2)} for i in range(32)]
    padded = [{"inputs_embeds": torch.cat([e["inputs_embeds"], 100 * torch.ones(2, 4)]),
               "attention_mask": torch.tensor([1, 1, 1, 0, 0]), "labels": e["labels"]} for e in short]
    a = KFACCurvature(model, params, make_loader(short, 8), device="cpu", correct_eigenvalues=False, progress=False)
    b = KFACCurvature(model, params, make_loader(padded, 8), device="cpu", correct_eigenvalues=False, progress=False)
    torch.testing.assert_close(a.blocks[0].inputs_cov, b.blocks[0].inputs_cov)
    torch.testing.assert_close(a.blocks[0].grads_cov, b.blocks[0].grads_cov)


def test_parameters_outside_linear_modules_are_refused_by_name():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(ValueError, match=r"1\.weight.*gauss-newton"):
        linear_blocks(model, list(model.parameters()))
