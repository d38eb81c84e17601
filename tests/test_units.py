"""Units, owned slices, gates and per-example gradients on every supported architecture."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_mape import MAPEConfig, MAPELayer
from peft_mape.tuner.architectures import ROLE_COLS, owned_indices, resolve_architecture
from peft_mape.common.data import make_loader, per_example_losses
from peft_mape.unlearning.statistics import mask_gradients, parameter_fisher_diagonal

from conftest import tiny_examples, tiny_model

EXPECTED_GATES = {  # (heads, kv heads, filters) per block of the tiny configs
    "bert": (4, 4, 24), "roberta": (4, 4, 24), "distilbert": (4, 4, 24), "gpt2": (4, 4, 24),
    "llama": (4, 2, 24), "mistral": (4, 2, 24), "qwen2": (4, 2, 24), "vit": (4, 4, 24),
}


def test_units_detected(arch_kind):
    model = tiny_model(arch_kind)
    arch = resolve_architecture(model, MAPEConfig())
    assert (arch.num_heads, arch.num_kv_heads, arch.num_filters) == EXPECTED_GATES[arch_kind]
    assert arch.num_layers == 2 and arch.head_dim == 4
    peft_model = get_peft_model(model, MAPEConfig())
    layers = [m for m in peft_model.modules() if isinstance(m, MAPELayer)]
    per_block = 4 if arch_kind == "gpt2" else (7 if arch.blocks[0].gate_proj else 6)
    assert len(layers) == 2 * per_block
    gated = sorted(m.gated_units for m in layers if m.role == ROLE_COLS)
    assert gated == sorted([4, 4, 24, 24])


def test_gates_and_empty_adapter_do_not_change_outputs(arch_kind):
    model = tiny_model(arch_kind)
    batch = make_loader(tiny_examples(arch_kind, 4), 4).__iter__().__next__()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    reference = model(**inputs).logits
    peft_model = get_peft_model(model, MAPEConfig())
    assert torch.equal(peft_model(**inputs).logits, reference)
    for m in peft_model.modules():
        if isinstance(m, MAPELayer) and m.role == ROLE_COLS:
            m.open_gate(4, torch.float32, "cpu")
    gated = peft_model(**inputs).logits
    for m in peft_model.modules():
        if isinstance(m, MAPELayer):
            m.close_gate()
    assert torch.equal(gated, reference)  # multiplying by 1.0 is exact


def test_per_example_mask_gradients_equal_a_loop(arch_kind):
    model = tiny_model(arch_kind)
    examples = tiny_examples(arch_kind, 5)
    peft_model = get_peft_model(model, MAPEConfig())
    tuner = peft_model.base_model
    batched = mask_gradients(tuner, make_loader(examples, 5), device="cpu", progress=False).per_example
    looped = [mask_gradients(tuner, make_loader([ex], 1), device="cpu", progress=False).per_example
              for ex in examples]
    for kind in ("heads", "filters"):
        loop = torch.cat([l[kind] for l in looped])
        assert batched[kind].shape == loop.shape
        assert torch.allclose(batched[kind], loop, atol=1e-5, rtol=1e-4), kind
        assert batched[kind].abs().sum() > 0


def test_mask_gradient_is_directional_derivative():
    """dl/dm_h equals the finite difference of the loss when head h's output is scaled."""
    model = tiny_model("bert").double()  # float64, so the finite difference is not rounding noise
    ex = tiny_examples("bert", 1)
    tuner = get_peft_model(model, MAPEConfig()).base_model
    grads = mask_gradients(tuner, make_loader(ex, 1), device="cpu", progress=False).per_example["heads"][0]
    layer = dict(tuner.mape_layers())[tuner.architecture().blocks[1].o_proj]
    batch = next(iter(make_loader(ex, 1)))
    eps = 1e-3
    values = []
    for sign in (1, -1):
        gate = layer.open_gate(1, torch.float32, "cpu")
        with torch.no_grad():
            gate[0, 2] += sign * eps
            values.append(float(per_example_losses(tuner.model, batch, None)[0]))
        layer.close_gate()
    assert (values[0] - values[1]) / (2 * eps) == pytest.approx(float(grads[1, 2]), rel=1e-4, abs=1e-9)


def test_owned_slices_bert():
    arch = resolve_architecture(tiny_model("bert"), MAPEConfig())
    b = arch.blocks[1]
    owned = owned_indices(arch, {"heads": {"1": [2]}, "filters": {1: [0, 5]}})
    assert owned[b.q_proj].tolist() == [8, 9, 10, 11]
    assert owned[b.k_proj].tolist() == [8, 9, 10, 11]
    assert owned[b.o_proj].tolist() == [8, 9, 10, 11]
    assert owned[b.up_proj].tolist() == [0, 5] and owned[b.down_proj].tolist() == [0, 5]
    assert not any(name.startswith("bert.encoder.layer.0.") for name in owned)
    side = owned_indices(arch, {"heads": {"1": [2]}, "filters": {"1": [0]}}, update_scope="output_side")
    assert set(side) == {b.o_proj, b.down_proj}


def test_owned_slices_gqa_group_ownership():
    """4 query heads over 2 KV heads: heads 0,1 share KV head 0; heads 2,3 share KV head 1."""
    arch = resolve_architecture(tiny_model("llama"), MAPEConfig())
    b = arch.blocks[0]
    owned = owned_indices(arch, {"heads": {"0": [1, 3]}, "filters": {"0": [7]}})
    assert owned[b.q_proj].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert owned[b.k_proj].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # both groups touched
    assert owned[b.v_proj].tolist() == owned[b.k_proj].tolist()
    one_group = owned_indices(arch, {"heads": {"0": [2, 3]}})
    assert one_group[b.k_proj].tolist() == [4, 5, 6, 7]
    assert owned[b.gate_proj].tolist() == [7] and owned[b.up_proj].tolist() == [7]


def test_owned_slices_gpt2_fused_qkv():
    arch = resolve_architecture(tiny_model("gpt2"), MAPEConfig())
    b = arch.blocks[0]
    rows = owned_indices(arch, {"heads": {"0": [1]}})[b.qkv_proj].tolist()
    assert rows == [4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39]  # q | k | v blocks of width 16


def test_unknown_architecture_names_the_fields():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.Linear(4, 4)

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block()])
            self.config = type("C", (), {"model_type": "oddformer"})()

    with pytest.raises(ValueError, match=r"oddformer.*layers_path.*o_proj.*up_proj.*down_proj"):
        resolve_architecture(Odd(), MAPEConfig())


def test_explicit_overrides_make_an_unknown_model_work():
    model = tiny_model("llama")
    model.config.model_type = "my-llama-fork"
    config = MAPEConfig(layers_path="layers", q_proj="self_attn.q_proj", k_proj="self_attn.k_proj",
                        v_proj="self_attn.v_proj", o_proj="self_attn.o_proj", up_proj="mlp.up_proj",
                        gate_proj="mlp.gate_proj", down_proj="mlp.down_proj", num_attention_heads=4,
                        num_key_value_heads=2)
    arch = resolve_architecture(model, config)
    assert (arch.num_heads, arch.num_kv_heads, arch.num_filters) == (4, 2, 24)


def test_per_example_parameter_gradients_equal_a_loop(arch_kind):
    model = tiny_model(arch_kind)
    examples = tiny_examples(arch_kind, 4)
    peft_model = get_peft_model(model, MAPEConfig())
    tuner = peft_model.base_model
    tuner.apply_selection("default", {"heads": {"0": [1], "1": [3]}, "filters": {"1": [2, 9]}})
    fisher = parameter_fisher_diagonal(tuner, "default", make_loader(examples, 4), device="cpu", progress=False)
    params = tuner.adapter_parameters("default")
    reference = [torch.zeros_like(p) for p in params]
    for ex in examples:
        batch = next(iter(make_loader([ex], 1)))
        grads = torch.autograd.grad(per_example_losses(peft_model, batch, None).sum(), params)
        for r, g in zip(reference, grads):
            r.add_(g.pow(2) / len(examples))
    for f, r in zip(fisher, reference):
        assert torch.allclose(f, r, atol=1e-7, rtol=1e-4)
    assert sum(float(f.sum()) for f in fisher) > 0


def _select_everything(tuner, name="default"):
    arch = tuner.architecture(name)
    layers = range(arch.num_layers)
    tuner.apply_selection(name, {"heads": {str(i): list(range(arch.num_heads)) for i in layers},
                                 "filters": {str(i): list(range(arch.num_filters)) for i in layers}})


def test_whole_weight_deltas_fold_into_one_matmul_with_the_same_outputs_and_gradients(arch_kind, monkeypatch):
    """selection="all" deltas go through x (W + D)^T: same logits and delta gradients as the
    separate x D^T matmul over the selected slices (fp32 rounding aside)."""
    model = tiny_model(arch_kind)
    batch = make_loader(tiny_examples(arch_kind, 4), 4).__iter__().__next__()
    peft_model = get_peft_model(model, MAPEConfig())
    tuner = peft_model.base_model
    _select_everything(tuner)
    torch.manual_seed(1)
    params = tuner.adapter_parameters("default")
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)

    def logits_and_grads():
        loss = per_example_losses(peft_model, batch, None).sum()
        return peft_model(**{k: v for k, v in batch.items() if k != "labels"}).logits, torch.autograd.grad(loss, params)

    layers = [layer for _, layer in tuner.mape_layers()]
    assert all(layer._covers_whole_weight("default") for layer in layers)
    dense_logits, dense_grads = logits_and_grads()
    monkeypatch.setattr(MAPELayer, "_covers_whole_weight", lambda self, name: False)
    sliced_logits, sliced_grads = logits_and_grads()
    assert torch.allclose(dense_logits, sliced_logits, atol=1e-5, rtol=1e-4)
    for a, b in zip(dense_grads, sliced_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)
    with tuner.muted(["default"]):
        base_logits = peft_model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert not torch.allclose(base_logits, sliced_logits, atol=1e-5)  # the deltas do act


def test_partial_and_half_precision_deltas_keep_their_own_matmul():
    model = get_peft_model(tiny_model("llama"), MAPEConfig(sparsity=0.5))
    tuner = model.base_model
    tuner.apply_selection("default", {"heads": {"0": [1]}, "filters": {"0": [2]}})
    assert not any(layer._covers_whole_weight("default") for _, layer in tuner.mape_layers()
                   if "default" in layer.mape_delta)
    half = get_peft_model(tiny_model("llama").to(torch.bfloat16), MAPEConfig())
    _select_everything(half.base_model)
    assert not any(layer._covers_whole_weight("default") for _, layer in half.base_model.mape_layers())
