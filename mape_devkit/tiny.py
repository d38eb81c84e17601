"""Random-init models of every supported architecture family, for the tests and the task-matrix
benchmark."""

from __future__ import annotations

import warnings

import torch
import transformers as T


def model_from_config(config, *, causal: bool, seed: int = 0):
    """A causal LM (``causal``), an image classifier (ViT configs) or a sequence classifier,
    initialised with ``seed``, in eval mode."""
    torch.manual_seed(seed)
    if causal:
        auto = T.AutoModelForCausalLM
    elif config.model_type == "vit":
        auto = T.AutoModelForImageClassification
    else:
        auto = T.AutoModelForSequenceClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_config(config).eval()


def tiny_config(kind: str, *, vocab_size: int, hidden_size: int = 16, intermediate_size: int = 24,
                num_labels: int = 3):
    """A 2-layer, 4-head config of ``kind`` (GQA with 2 key/value heads for llama / mistral /
    qwen2; 8x8 images in 4x4 patches for vit). ``num_labels`` serves the classification heads and
    is ignored by causal-LM heads."""
    common = dict(num_labels=num_labels)
    if kind in ("bert", "roberta"):
        cls = T.BertConfig if kind == "bert" else T.RobertaConfig
        return cls(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=intermediate_size, max_position_embeddings=64, pad_token_id=1, **common)
    if kind == "distilbert":
        return T.DistilBertConfig(vocab_size=vocab_size, dim=hidden_size, n_layers=2, n_heads=4,
                                  hidden_dim=intermediate_size, max_position_embeddings=64, pad_token_id=0, **common)
    if kind == "gpt2":
        return T.GPT2Config(vocab_size=vocab_size, n_embd=hidden_size, n_layer=2, n_head=4, n_inner=intermediate_size,
                            n_positions=64, bos_token_id=0, eos_token_id=0, pad_token_id=0, **common)
    if kind in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[kind]
        return cls(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=intermediate_size, max_position_embeddings=64,
                   bos_token_id=0, eos_token_id=0, pad_token_id=0, **common)
    if kind == "vit":
        return T.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=hidden_size, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=intermediate_size, **common)
    raise KeyError(f"no tiny config for model kind {kind!r}")
