"""Per-token log-probabilities of a causal language model, the input of the LM attacks."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..common.data import to_device
from ..common.lm_head import shifted_log_probs
from ..common.modes import eval_mode


def token_log_probs(model, loader, device=None, *, progress: bool = False,
                    desc: str = "token log-probs") -> list[np.ndarray]:
    """log p(token | prefix) of every scored token, one array per example.

    ``loader`` yields dict batches with ``input_ids`` and token ``labels`` (-100 = not scored,
    e.g. prompt or padding), as for the model's own causal-LM loss: position t+1's label is
    predicted from positions <= t. Dropout is off; no gradients.
    """
    device = device or next(model.parameters()).device
    rows: list[np.ndarray] = []
    with torch.no_grad(), eval_mode(model):
        for batch in tqdm(loader, desc=desc, disable=not progress, leave=False):
            batch = to_device(batch, device)
            labels = batch.pop("labels", None)
            if labels is None or labels.dim() != 2:
                raise ValueError("token log-probs need token labels of shape [batch, length] "
                                 "(-100 marks tokens that are not scored)")
            logits = model(**batch).logits.float()
            if logits.dim() != 3:
                raise ValueError(f"expected token-level logits [batch, length, vocab], got {tuple(logits.shape)}")
            picked, scored = shifted_log_probs(logits, labels)
            for row, keep in zip(picked.cpu(), scored.cpu()):
                if not keep.any():
                    raise ValueError("an example has no scored token (every label is -100)")
                rows.append(row[keep].double().numpy())
    return rows
