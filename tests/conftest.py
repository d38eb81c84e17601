"""Tiny random-init models of every supported architecture, and toy data for them."""

from __future__ import annotations


import pytest
import torch
import transformers as T

import peft_mape  # noqa: F401  (registers the MAPE tuner)
from mape_devkit.tiny import model_from_config
from mape_devkit.tiny import tiny_config as shared_tiny_config

VOCAB = 40
SEQ_CLS = ("bert", "roberta", "distilbert")
CAUSAL = ("gpt2", "llama", "mistral", "qwen2")
ARCHITECTURES = SEQ_CLS + CAUSAL + ("vit",)


def tiny_config(kind: str):
    return shared_tiny_config(kind, vocab_size=VOCAB)


def tiny_model(kind: str, seed: int = 0):
    return model_from_config(tiny_config(kind), causal=kind in CAUSAL, seed=seed)


def tiny_examples(kind: str, n: int, seed: int = 0, length: int = 6, vary_length: bool = True):
    """Model-ready examples (lists of dicts of tensors) for the tiny model of ``kind``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        if kind == "vit":
            out.append({"pixel_values": torch.randn(3, 8, 8, generator=g),
                        "labels": torch.randint(0, 3, (), generator=g)})
            continue
        size = length - (i % 3 if vary_length else 0)
        ids = torch.randint(2, VOCAB, (size,), generator=g)
        ex = {"input_ids": ids, "attention_mask": torch.ones(size, dtype=torch.long)}
        ex["labels"] = ids.clone() if kind in CAUSAL else torch.randint(0, 3, (), generator=g)
        out.append(ex)
    return out


def memorised_model(kind: str, *, epochs: int, lr: float, vary_length: bool = True, seed: int = 0):
    """A tiny model trained on 6 forget + 24 retain examples until it has memorised them."""
    from peft_mape.common.data import make_loader

    torch.manual_seed(seed)
    model = tiny_model(kind)
    forget = tiny_examples(kind, 6, seed=1, vary_length=vary_length)
    retain = tiny_examples(kind, 24, seed=2, vary_length=vary_length)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loader = make_loader(forget + retain, 10, shuffle=True)
    model.train()
    for _ in range(epochs):
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval(), forget, retain


@pytest.fixture(params=ARCHITECTURES)
def arch_kind(request):
    return request.param


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny matrices gain nothing from threads, and on a busy
    2-core machine OpenMP threads of concurrent processes spin against each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def s3t_bert(layers: int, seed: int = 0):
    """The tiny BERT classifier (vocab 64, width 16, 2 heads) the S3T tests train LoRA blocks on."""
    torch.manual_seed(seed)
    config = T.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                          intermediate_size=32, num_labels=3)
    return T.BertForSequenceClassification(config)
