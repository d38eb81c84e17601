"""Gradient checkpointing and half-precision base models."""

from __future__ import annotations

import copy

import torch
from peft import get_peft_model

from peft_mape import MAPEConfig
from peft_mape.common.data import pad_collate
from peft_mape.common.modes import eval_mode
from conftest import memorised_model, tiny_examples, tiny_model


def _saved_elements(model, batch) -> int:
    """Elements autograd keeps for the backward pass of one forward."""
    saved = [0]

    def pack(tensor):
        saved[0] += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch).loss
    return saved[0]


def test_eval_mode_keeps_gradient_checkpointing_and_turns_dropout_off():
    batch = pad_collate(tiny_examples("llama", 4))
    plain, checkpointed = tiny_model("llama"), tiny_model("llama")
    checkpointed.gradient_checkpointing_enable()
    for model in (plain, checkpointed):
        model.config.attention_dropout = 0.5
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.5
        for p in model.parameters():
            p.requires_grad_(False)
        model.model.layers[0].mlp.down_proj.weight.requires_grad_(True)
    checkpointed.train()
    with eval_mode(plain), eval_mode(checkpointed):
        assert _saved_elements(checkpointed, batch) < 0.6 * _saved_elements(plain, batch)
        with torch.no_grad():  # deterministic: attention dropout is off inside the checkpointed layers
            assert torch.equal(checkpointed(**batch).logits, checkpointed(**batch).logits)
    assert checkpointed.training and all(m.training for m in checkpointed.modules())  # modes restored
    assert not plain.training


def test_unlearning_with_gradient_checkpointing_gives_the_same_adapter():
    base, forget, retain = memorised_model("llama", epochs=10, lr=1e-2)
    states = []
    for checkpointing in (False, True):
        model = copy.deepcopy(base)
        if checkpointing:
            model.gradient_checkpointing_enable()
        peft_model = get_peft_model(model, MAPEConfig(sparsity=0.9))
        peft_model.unlearn(forget, retain, max_steps=10, progress=False)
        states.append({n: p.detach().clone() for n, p in peft_model.named_parameters() if "mape_delta" in n})
    assert states[0] and all(torch.allclose(v, states[1][k], atol=1e-6) for k, v in states[0].items())
    assert any(float(v.abs().max()) > 0 for v in states[0].values())


def test_a_bf16_model_keeps_fp32_deltas_and_statistics():
    base, forget, retain = memorised_model("llama", epochs=10, lr=1e-2)
    model = get_peft_model(copy.deepcopy(base).to(torch.bfloat16), MAPEConfig(sparsity=0.9))
    report = model.unlearn(forget, retain, max_steps=5, progress=False)
    deltas = [p for n, p in model.named_parameters() if "mape_delta" in n]
    assert deltas and all(p.dtype == torch.float32 for p in deltas)
    assert all(isinstance(v, float) for row in report.scores["heads"] for v in row)
    assert report.forget_loss_after > report.forget_loss_before


def test_layers_that_apply_dropout_themselves_stay_in_eval_mode():
    """OPT's decoder layers call dropout with their own training flag: turning it on to
    checkpoint them would make every loss random, so they are not checkpointed."""
    import transformers as T

    config = T.OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, ffn_dim=24, num_attention_heads=4,
                         max_position_embeddings=64, dropout=0.5, word_embed_proj_dim=16)
    torch.manual_seed(0)
    model = T.OPTForCausalLM(config)
    model.gradient_checkpointing_enable()
    model.train()
    batch = pad_collate(tiny_examples("llama", 4))
    with eval_mode(model), torch.no_grad():
        assert torch.equal(model(**batch).logits, model(**batch).logits)
