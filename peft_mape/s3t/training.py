"""The optimisation loop of one S3T stage, seeded only by what the stage depends on."""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .causal_lm import causal_lm_loss
from .config import S3TConfig
from .data import ExampleStore


def stage_seed(seed: int, shard: int, slices: Sequence[int]) -> int:
    """Seed of the stage trained on ``slices`` (in order) of ``shard``.

    It deliberately ignores slice versions and everything outside the prefix, so a stage rebuilt
    after a deletion, or trained from scratch without the deleted examples, follows the same
    random stream and differs only by the data it no longer sees.
    """
    key = f"s3t|{seed}|{shard}|{','.join(str(k) for k in slices)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def train_stage(model: nn.Module, trainable: Sequence[nn.Parameter], store: ExampleStore,
                rows: Sequence[int], config: S3TConfig, seed: int) -> float:
    """Fit ``trainable`` on ``rows`` with AdamW; returns the mean loss of the last epoch.

    The caller seeds torch's global RNG (LoRA init, dropout); batch order uses its own generator.
    Not the unlearning loop (``peft_mape.common.loop``): a stage trains in train mode with
    AdamW and weight decay over epoch permutations of its own seed, which a rebuild must replay.
    The loss is the cross-entropy of the class logits, or for ``task="causal_lm"`` each example's
    mean answer-token cross-entropy averaged over the batch (:func:`causal_lm_loss`).
    """
    if not rows:
        return math.nan
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    device = trainable[0].device
    model.train()
    mean_loss = math.nan
    for _ in range(config.epochs_per_stage):
        permutation = torch.randperm(len(rows), generator=generator).tolist()
        total, batches = 0.0, 0
        for start in range(0, len(rows), config.batch_size):
            inputs, labels = store.batch([rows[i] for i in permutation[start:start + config.batch_size]])
            inputs = {k: v.to(device) for k, v in inputs.items()}
            if config.task == "causal_lm":
                loss = causal_lm_loss(model, inputs, labels.to(device))
            else:
                loss = F.cross_entropy(model(**inputs).logits, labels.to(device))
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += float(loss.detach())
            batches += 1
        mean_loss = total / batches
    model.eval()
    return mean_loss
