"""Random-init models from a config, for the tests and the task-matrix benchmark."""

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
