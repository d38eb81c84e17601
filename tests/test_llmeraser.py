"""LLMEraser influence edits of LoRA adapters (peft_mape.llmeraser).

Correctness is pinned on a convex toy where retraining is exact: a linear classifier whose
hidden projection carries a rank-1 LoRA adapter (and, in one variant, a trainable head through
``modules_to_save``), fitted by full-batch L-BFGS to a tight minimum of

    J(theta) = (1/n) sum_i CE(z_i) + (lambda / 2) ||theta||^2

and retrained the same way on the edited data from that minimum. The L2 penalty makes the
minimum isolated (rank 1 and balanced factors: no flat direction is left) and is exactly the
damping of the edit, so the edit's only error is the first-order one: for small edits it must
land near the retrained adapter. A wrong sign points away from it; a wrong 1/n scale overshoots
or stops short; both fail the distance bound.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from peft_mape.llmeraser import InstanceRemoval, QueryModification, ResponseCorrection, erase, undo
from peft_mape.unlearning.hessian import gradient_sum

from conftest import tiny_examples, tiny_model

DIM, CLASSES, N, WEIGHT_DECAY = 6, 3, 200, 1e-2


class LinearClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, pixel_values, labels=None):
        return SimpleNamespace(logits=self.head(self.hidden(pixel_values)))


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, DIM, generator=g, dtype=torch.float64)
    teacher = torch.randn(DIM, CLASSES, generator=g)
    y = torch.distributions.Categorical(logits=(x @ teacher.double()).float()).sample()
    return [{"pixel_values": x[i], "labels": y[i]} for i in range(N)]


def _trainable(model):
    return [p for n, p in model.named_parameters() if ".default" in n]


def _fit(model, examples) -> None:
    """Minimise J over the adapter's tensors from where they are, to a gradient norm ~1e-7."""
    params = _trainable(model)
    x = torch.stack([e["pixel_values"] for e in examples])
    y = torch.stack([e["labels"] for e in examples])
    optimizer = torch.optim.LBFGS(params, lr=1, max_iter=2000, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        # per-example weight 1/N whatever the size of ``examples`` (the influence convention)
        loss = nn.functional.cross_entropy(model(x).logits, y, reduction="sum") / N
        loss = loss + WEIGHT_DECAY / 2 * sum((p ** 2).sum() for p in params)
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)


def _vector(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in _trainable(model)])


def _fitted(modules_to_save: bool, seed: int = 0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = LinearClassifier().double()
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["hidden"], lora_dropout=0.0,
                        modules_to_save=["head"] if modules_to_save else None)
    model = get_peft_model(base, config)
    model.double()
    with torch.no_grad():  # B = 0 at PEFT's init is a saddle of the factorisation: start off it
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    train = _data(seed)
    _fit(model, train)
    return model, train


def _edit_case(kind: str, train, k: int = 2):
    g = torch.Generator().manual_seed(7)
    picked = torch.randperm(N, generator=g)[:k].tolist()
    old = [train[i] for i in picked]
    if kind == "removal":
        return InstanceRemoval(old), [e for i, e in enumerate(train) if i not in picked]
    if kind == "correction":
        new = [{"pixel_values": e["pixel_values"], "labels": (e["labels"] + 1) % CLASSES} for e in old]
        return ResponseCorrection(old, new), [e for i, e in enumerate(train) if i not in picked] + new
    new = [{"pixel_values": e["pixel_values"] + 0.5 * torch.randn(DIM, generator=g, dtype=e["pixel_values"].dtype),
            "labels": e["labels"]} for e in old]
    return QueryModification(old, new), [e for i, e in enumerate(train) if i not in picked] + new


def _retrained(model, edited_train):
    import copy

    twin = copy.deepcopy(model)
    _fit(twin, edited_train)
    return _vector(twin)


@pytest.mark.parametrize("modules_to_save", [False, True], ids=["lora-only", "with-modules_to_save"])
@pytest.mark.parametrize("kind", ["removal", "correction", "modification"])
def test_edit_moves_the_adapter_to_the_retrained_one_on_a_convex_toy(kind, modules_to_save):
    model, train = _fitted(modules_to_save)
    request, edited_train = _edit_case(kind, train)
    start = _vector(model)
    target = _retrained(model, edited_train)
    report = erase(model, request, train, damping=WEIGHT_DECAY, curvature="hessian", solver_steps=200,
                   hessian_examples=N, progress=False)
    moved, wanted = _vector(model) - start, target - start
    cosine = float(moved @ wanted / (moved.norm() * wanted.norm()))
    remaining = float((_vector(model) - target).norm() / wanted.norm())
    assert report.scale == 1.0 and report.relative_residual < 1e-3
    assert cosine > 0.9, cosine
    assert remaining < 0.2, remaining  # at least 80% of the distance to the retrained adapter is gone


def test_the_default_options_also_move_toward_the_retrained_adapter():
    """Defaults: a 64-example sample, Gauss-Newton curvature, automatic damping: a rougher edit
    than the exact one above, but still most of the way in the right direction."""
    model, train = _fitted(modules_to_save=True)
    request, edited_train = _edit_case("correction", train, k=4)
    start = _vector(model)
    target = _retrained(model, edited_train)
    report = erase(model, request, train, progress=False)
    moved, wanted = _vector(model) - start, target - start
    assert report.damping_rule.startswith("auto")
    assert float(moved @ wanted / (moved.norm() * wanted.norm())) > 0.75
    assert float((_vector(model) - target).norm()) < 0.75 * float(wanted.norm())
    assert report.losses_after["new"] < report.losses_before["new"]
    assert report.losses_after["old"] > report.losses_before["old"]


def test_the_sign_and_the_one_over_n_scale_are_pinned():
    """Removing an example raises its loss; the first-order step is exactly (1/n) (H + lambda)^-1 g."""
    model, train = _fitted(modules_to_save=False)
    request, _ = _edit_case("removal", train, k=1)
    start = _vector(model)
    options = dict(damping=WEIGHT_DECAY, curvature="hessian", solver_steps=200, hessian_examples=N, line_search=False,
                   progress=False)
    report = erase(model, request, train, **options)
    half = _vector(model) - start
    undo(model, report)
    erase(model, request, train, num_train_examples=2 * N, **options)
    assert torch.allclose(_vector(model) - start, half / 2, rtol=1e-6, atol=1e-12)
    assert report.losses_after["old"] > report.losses_before["old"]
    assert report.linearisation_ratio == pytest.approx(1.0, abs=0.2)


def test_mixed_requests_add_their_right_hand_sides():
    model, train = _fitted(modules_to_save=False)
    options = dict(damping=WEIGHT_DECAY, curvature="hessian", solver_steps=200, hessian_examples=N, line_search=False,
                   progress=False)
    start = _vector(model)
    together = erase(model, InstanceRemoval(train[:3]), train, **options)
    joint = _vector(model) - start
    undo(model, together)
    assert torch.equal(_vector(model), start)  # undo is exact
    erase(model, [InstanceRemoval(train[:1]), InstanceRemoval(train[1:3])], train, **options)
    assert torch.allclose(_vector(model) - start, joint, rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------- transformers models


def _lora_classifier(modules_to_save: bool = True):
    from peft import LoraConfig, get_peft_model

    base = tiny_model("bert")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.1,
                        modules_to_save=["classifier"] if modules_to_save else None)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _adapter_state(model, adapter="default"):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


def _other_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".default." not in n}


def test_edit_of_a_bert_lora_changes_only_the_adapter_and_undo_is_exact():
    model = _lora_classifier()
    train = tiny_examples("bert", 40, seed=3)
    old = train[:4]
    new = [dict(e, labels=(e["labels"] + 1) % 3) for e in old]
    before, frozen = _adapter_state(model), _other_state(model)
    report = erase(model, ResponseCorrection(old, new), train, progress=False)
    after = _adapter_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(frozen[n], v) for n, v in _other_state(model).items())
    assert report.guarantee == "approximate" and set(report.seconds) >= {"prepare", "gradients", "solve", "step"}
    assert report.losses_after["train"] <= report.retain_loss_budget
    undo(model, report)
    assert all(torch.equal(before[n], v) for n, v in _adapter_state(model).items())


def test_copy_to_leaves_the_original_adapter_untouched(tmp_path):
    model = _lora_classifier()
    train = tiny_examples("bert", 40, seed=3)
    before = _adapter_state(model)
    report = erase(model, InstanceRemoval(train[:3]), train, copy_to="edited", progress=False)
    assert model.active_adapter == "edited" and report.edited_adapter == "edited"
    assert all(torch.equal(before[n], v) for n, v in _adapter_state(model).items())
    assert any(not torch.equal(before[n], v)
               for n, v in ((n.replace(".edited.", ".default."), v) for n, v in _adapter_state(model, "edited").items()))
    report.save(tmp_path / "edit.json")
    saved = (tmp_path / "edit.json").read_text()
    assert '"guarantee": "approximate"' in saved and "originals" not in saved
    undo(model, report)
    assert "edited" not in model.peft_config and model.active_adapter == "default"


def test_a_causal_lm_lora_edit_runs_and_checks_its_pairs():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    train = tiny_examples("llama", 30, seed=4, vary_length=False)
    prompt = 3
    old = [dict(e, labels=torch.cat([torch.full((prompt,), -100), e["input_ids"][prompt:]])) for e in train[:2]]
    new = []
    for e in old:
        ids = e["input_ids"].clone()
        ids[prompt:] = (ids[prompt:] + 1) % 38 + 2
        new.append({"input_ids": ids, "attention_mask": e["attention_mask"],
                    "labels": torch.cat([torch.full((prompt,), -100), ids[prompt:]])})
    report = erase(model, ResponseCorrection(old, new), train, progress=False)
    assert math.isfinite(report.relative_residual) and report.losses_after["new"] <= report.losses_before["new"]
    with pytest.raises(ValueError, match="query_modification pair 0: old and new differ in their answer tokens"):
        erase(model, QueryModification(old, new), train, progress=False)


@pytest.mark.parametrize("bad, message", [
    (dict(damping=-1.0), "damping must be a number >= 0 or 'auto', got -1.0"),
    (dict(damping="big"), "damping must be a number >= 0 or 'auto', got 'big'"),
    (dict(solver="lbfgs"), "solver must be one of"),
    (dict(hessian_examples=0), "hessian_examples must be an integer >= 1, got 0"),
    (dict(num_train_examples=0), "num_train_examples must be >= 1, got 0"),
])
def test_bad_options_are_refused_before_any_work(bad, message):
    model = _lora_classifier()
    train = tiny_examples("bert", 10)
    before = _adapter_state(model)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        erase(model, InstanceRemoval(train[:1]), train, progress=False, **bad)
    assert all(torch.equal(before[n], v) for n, v in _adapter_state(model).items())


def test_bad_requests_and_models_get_clear_errors():
    model = _lora_classifier()
    train = tiny_examples("bert", 10)
    with pytest.raises(ValueError, match="old has 2 examples and new has 1"):
        erase(model, ResponseCorrection(train[:2], train[:1]), train)
    with pytest.raises(ValueError, match="response_correction pair 0: old and new differ in their inputs"):
        erase(model, ResponseCorrection(train[:1], train[1:2]), train)
    with pytest.raises(ValueError, match="query_modification pair 0: old and new differ in their labels"):
        erase(model, QueryModification(train[:1], [dict(train[0], labels=(train[0]["labels"] + 1) % 3)]), train)
    with pytest.raises(TypeError, match="request: expected one of"):
        erase(model, train[:1], train)
    with pytest.raises(TypeError, match="needs a peft.PeftModel"):
        erase(tiny_model("bert"), InstanceRemoval(train[:1]), train)
    with pytest.raises(TypeError, match="unknown option"):
        erase(model, InstanceRemoval(train[:1]), train, dampin=1.0)


def test_a_failing_edit_leaves_the_model_as_it_was():
    model = _lora_classifier()
    train = tiny_examples("bert", 20)
    before = _adapter_state(model)
    calls = {"n": 0}

    def failing_loss(outputs, batch):
        calls["n"] += 1
        if calls["n"] > 12:  # fails inside the step search, after the adapter has been moved
            raise RuntimeError("boom")
        return nn.functional.cross_entropy(outputs.logits, batch["labels"], reduction="none")

    with pytest.raises(RuntimeError, match="boom"):
        erase(model, InstanceRemoval(train[:2]), train, loss_fn=failing_loss, copy_to="copy", progress=False)
    assert "copy" not in model.peft_config and model.active_adapter == "default"
    with pytest.raises(RuntimeError, match="boom"):
        calls["n"] = 0
        erase(model, InstanceRemoval(train[:2]), train, loss_fn=failing_loss, progress=False)
    assert all(torch.equal(before[n], v) for n, v in _adapter_state(model).items())


def test_gauss_newton_equals_the_hessian_where_the_model_is_linear_and_is_never_negative():
    from peft_mape.common.data import make_loader
    from peft_mape.unlearning.hessian import gauss_newton_vector_product, hessian_vector_product

    torch.manual_seed(0)
    model = LinearClassifier().double()
    params = list(model.head.parameters())  # logits are linear in the head
    batches = list(make_loader(_data()[:50], 16))
    vector = [torch.randn_like(p) for p in params]
    exact = hessian_vector_product(model, params, batches, vector, device="cpu")
    gauss_newton = gauss_newton_vector_product(model, params, batches, vector, device="cpu")
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(exact, gauss_newton))

    bert = _lora_classifier()
    params = [p for n, p in bert.named_parameters() if ".default." in n]
    batches = list(make_loader(tiny_examples("bert", 12), 6))
    for seed in range(3):
        vector = [torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)) for p in params]
        product = gauss_newton_vector_product(bert, params, batches, vector, device="cpu")
        assert sum(float((v * g).sum()) for v, g in zip(vector, product)) >= -1e-6


def test_the_exact_hessian_raises_its_damping_after_negative_curvature():
    model, train = _fitted(modules_to_save=True)
    request, _ = _edit_case("correction", train, k=4)
    report = erase(model, request, train, curvature="hessian", hessian_examples=64, progress=False)
    assert len(report.dampings_tried) > 1 and report.dampings_tried == sorted(report.dampings_tried)
    assert "raised to" in report.damping_rule


def test_gradient_sums_of_bf16_tensors_accumulate_in_fp32():
    model = nn.Linear(4, 2).to(torch.bfloat16)
    examples = [{"pixel_values": torch.randn(4, dtype=torch.bfloat16), "labels": torch.tensor(i % 2)} for i in range(8)]

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = model

        def forward(self, pixel_values, labels=None):
            return SimpleNamespace(logits=self.linear(pixel_values))

    from peft_mape.common.data import make_loader

    totals = gradient_sum(Classifier(), list(model.parameters()), make_loader(examples, 4), device="cpu",
                          progress=False)
    assert all(t.dtype == torch.float32 for t in totals)



@pytest.mark.parametrize("kind", ["removal", "correction", "modification"])
def test_the_kfac_edit_moves_a_lora_toward_the_retrained_one_on_the_convex_toy(kind):
    """K-FAC drops the coupling between lora_A and lora_B (one block each): less exact than the
    matrix-free solve above (cosine 0.92-0.99 vs 0.996 on removal), still pointing the right way."""
    model, train = _fitted(modules_to_save=False)
    request, edited_train = _edit_case(kind, train)
    start = _vector(model)
    target = _retrained(model, edited_train)
    report = erase(model, request, train, damping=WEIGHT_DECAY, curvature="kfac", hessian_examples=N,
                   progress=False)
    moved, wanted = _vector(model) - start, target - start
    cosine = float(moved @ wanted / (moved.norm() * wanted.norm()))
    assert report.solver == "direct" and report.solver_iterations == 0 and report.curvature == "kfac"
    assert cosine > (0.6 if kind == "modification" else 0.85), cosine
    assert float((_vector(model) - target).norm()) < float(wanted.norm())


def test_kfac_edits_a_bert_lora_with_its_defaults_and_refuses_what_it_cannot_factorise():
    model = _lora_classifier()
    train = tiny_examples("bert", 40, seed=3)
    old = train[:4]
    new = [dict(e, labels=(e["labels"] + 1) % 3) for e in old]
    before = _adapter_state(model)
    report = erase(model, ResponseCorrection(old, new), train, curvature="kfac", progress=False)
    assert report.damping_rule.startswith("auto") and "EK-FAC" in report.damping_rule
    assert report.hessian_examples == 40 and report.losses_after["train"] <= report.retain_loss_budget
    assert report.losses_after["new"] < report.losses_before["new"]
    undo(model, report)
    with pytest.raises(ValueError, match="curvature='kfac' samples labels"):
        erase(model, InstanceRemoval(old), train, curvature="kfac", loss_fn=lambda o, b: o.logits.sum(-1))
    from peft import LoraConfig, get_peft_model

    embedded = get_peft_model(tiny_model("bert"), LoraConfig(r=2, target_modules=["word_embeddings", "query"]))
    with pytest.raises(ValueError, match="nn.Linear modules only.*word_embeddings"):
        erase(embedded, InstanceRemoval(old), train, curvature="kfac", progress=False)
    assert all(torch.equal(before[n], v) for n, v in _adapter_state(model).items())


def test_a_response_correction_of_a_classifier_takes_one_forward_per_pair():
    """The paired pass gives the same right-hand side and losses as the two separate sums."""
    from peft_mape.common.data import make_loader
    from peft_mape.unlearning.hessian import gradient_difference_sum

    model = _lora_classifier()
    model.eval()
    train = tiny_examples("bert", 12, seed=4)
    new = [dict(e, labels=(e["labels"] + 1) % 3) for e in train]
    params = [p for n, p in model.named_parameters() if ".default." in n]
    for p in params:
        p.requires_grad_(True)
    paired, old_loss, new_loss = gradient_difference_sum(model, params, make_loader(train, 5), make_loader(new, 5),
                                                         device="cpu", progress=False)
    old_sum = gradient_sum(model, params, make_loader(train, 5), device="cpu", progress=False)
    new_sum = gradient_sum(model, params, make_loader(new, 5), device="cpu", progress=False)
    for got, a, b in zip(paired, old_sum, new_sum):
        torch.testing.assert_close(got, a - b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        batch = next(iter(make_loader(train, 12)))
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        expected_old = float(nn.functional.cross_entropy(logits, batch["labels"]))
        expected_new = float(nn.functional.cross_entropy(logits, (batch["labels"] + 1) % 3))
    assert abs(old_loss - expected_old) < 1e-5 and abs(new_loss - expected_new) < 1e-5
