"""Configuration of S3T (sequence-aware sharded sliced training, SPEC §6)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

from peft import LoraConfig

TASKS = ("sequence_classification", "causal_lm")
STRATEGIES = ("cyclic", "bms")
HEAD_MODES = ("per_stage", "first_stage", "frozen")
AGGREGATIONS = ("mean_logits", "mean_probs", "vote")
# What ``None`` means for the task-dependent fields: a classifier trains its head and takes labels
# from "label"; a causal LM keeps its (usually tied) output head frozen, takes per-token labels
# from "labels" as transformers' LM collators do, and mixes the shards' next-token distributions.
TASK_DEFAULTS = {
    "sequence_classification": {"head": "per_stage", "head_modules": ("classifier",),
                                "aggregation": "mean_logits", "label_column": "label"},
    "causal_lm": {"head": "frozen", "head_modules": (), "aggregation": "mean_probs", "label_column": "labels"},
}
CAUSAL_LM_HEADS = ("frozen",)
CAUSAL_LM_AGGREGATIONS = ("mean_probs",)
# Orders beyond the first L under `bms` are ranked exhaustively over all L! permutations.
BMS_EXHAUSTIVE_MAX_SLICES = 8


@dataclass
class S3TConfig:
    """How S3T shards, slices, orders and trains LoRA blocks.

    Args:
        task: ``"sequence_classification"`` (one integer label per example, [N, C] logits) or
            ``"causal_lm"`` (per-token labels, -100 on the prompt and padding; the loss is each
            example's mean answer-token cross-entropy, averaged over the batch; shards serve the
            mean of their next-token probabilities, see ``S3TModel.as_causal_lm``).
        lora: the LoRA recipe (rank, alpha, dropout, ``target_modules``). Each stage adapter uses a
            copy whose ``target_modules`` are the exact module names of one layer block.
            ``modules_to_save`` must stay unset: the classification head is handled by ``head``.
        num_shards: m, the number of disjoint data shards (one served model per shard).
        num_slices: L, slices per shard; also the number of layer blocks.
        budget: B, slice orders trained per shard (1 <= B <= L!). Only B' = min(B, L) orders
            can start with distinct slices, so budgets above L add accuracy, not capacity.
        strategy: ``"cyclic"`` (evenly spaced rotations, uniform deletion odds) or ``"bms"``
            (bipartite matching against ``deletion_prior``).
        deletion_prior: for ``bms``: the probability that a deletion request lands in each
            slice, as L values (all shards) or m rows of L values; each row sums to 1.
            ``None`` means uniform.
        expected_deletions: t, the number of deletions the ``bms`` score plans for.
        layer_blocks: L groups of exact layer indices, top (output side) block first.
            ``None`` splits the layers carrying LoRA into L contiguous blocks.
        layers_pattern: name of the layer list in module names (``"layer"`` for BERT,
            ``"layers"`` for Llama); ``None`` takes the first numbered path segment.
        head: how the task head is trained and snapshotted: ``"per_stage"`` trains it at every
            stage and serves stage j's snapshot with block j; ``"first_stage"`` trains it at
            stage 1 only; ``"frozen"`` never trains it. ``None``: ``"per_stage"`` for
            classification, ``"frozen"`` (the only choice) for ``causal_lm``.
        head_modules: names (or dotted suffixes) of the head modules, e.g. ``("classifier",)``;
            may be empty only with ``head="frozen"``, and must be for ``causal_lm``. ``None``:
            ``("classifier",)`` for classification, ``()`` for ``causal_lm``.
        aggregation: how shard predictions combine: ``"mean_logits"``, ``"mean_probs"`` or
            ``"vote"`` (fraction of shards voting for each class); ``causal_lm`` allows only
            ``"mean_probs"`` (its default).
        label_column: the label column; ``None``: ``"label"`` for classification, ``"labels"``
            for ``causal_lm``.
    """

    lora: LoraConfig
    num_shards: int = 1
    num_slices: int = 2
    budget: int = 1
    strategy: str = "cyclic"
    deletion_prior: Optional[Any] = None
    expected_deletions: int = 1
    layer_blocks: Optional[Any] = None
    layers_pattern: Optional[str] = None
    head: Optional[str] = None
    head_modules: Optional[tuple] = None
    aggregation: Optional[str] = None
    epochs_per_stage: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    batch_size: int = 16
    eval_batch_size: int = 64
    id_column: str = "id"
    label_column: Optional[str] = None
    seed: int = 0
    # Last, so positional construction keeps its meaning; saved configs without it are classifiers.
    task: str = "sequence_classification"

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASKS)
        for name, default in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if not isinstance(self.lora, LoraConfig):
            raise ValueError(f"lora must be a peft.LoraConfig, got {type(self.lora).__name__}")
        if self.lora.modules_to_save:
            raise ValueError(
                "lora.modules_to_save must be unset: S3T snapshots the head itself, see "
                "S3TConfig.head and S3TConfig.head_modules"
            )
        for name in ("num_shards", "num_slices", "budget", "expected_deletions", "epochs_per_stage",
                     "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        _check_choice("strategy", self.strategy, STRATEGIES)
        _check_choice("head", self.head, HEAD_MODES)
        _check_choice("aggregation", self.aggregation, AGGREGATIONS)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        if isinstance(self.head_modules, str):
            self.head_modules = (self.head_modules,)
        self.head_modules = tuple(self.head_modules)
        if not self.head_modules and self.head != "frozen":
            raise ValueError(f"head_modules must name at least one module when head={self.head!r} trains it")
        if not isinstance(self.label_column, str) or not self.label_column:
            raise ValueError(f"label_column must be a column name, got {self.label_column!r}")
        if self.task == "causal_lm":
            self._check_causal_lm()
        self._check_budget()
        self.deletion_prior = self._normalized_prior()
        self.layer_blocks = self._normalized_blocks()

    def _check_causal_lm(self) -> None:
        # Not supported: a causal LM's output head is usually tied to the input embeddings, so a
        # head snapshot per stage would copy the whole vocabulary matrix (28M parameters for
        # SmolLM2-135M) and leave the embeddings out of the base-model fingerprint. The LoRA
        # blocks are what S3T slices; the head stays part of the frozen base model.
        if self.head not in CAUSAL_LM_HEADS:
            raise ValueError(
                f"head must be one of {CAUSAL_LM_HEADS} for task='causal_lm', got {self.head!r}: the LM head "
                "(usually tied to the input embeddings) stays frozen and only the LoRA blocks train"
            )
        if self.head_modules:
            raise ValueError(
                f"head_modules must be empty for task='causal_lm', got {self.head_modules!r}: the frozen LM head "
                "is part of the base model, so there is nothing to snapshot"
            )
        if self.aggregation not in CAUSAL_LM_AGGREGATIONS:
            raise ValueError(
                f"aggregation must be one of {CAUSAL_LM_AGGREGATIONS} for task='causal_lm', got "
                f"{self.aggregation!r}: shards serve the mean of their next-token probabilities"
            )

    def _check_budget(self) -> None:
        slices = self.num_slices
        if self.budget > math.factorial(slices):
            raise ValueError(
                f"budget B={self.budget} exceeds the {math.factorial(slices)} distinct orders of "
                f"L={slices} slices (L!)"
            )
        if self.strategy == "bms" and self.budget > slices > BMS_EXHAUSTIVE_MAX_SLICES:
            raise ValueError(
                f"strategy='bms' supports budget > L only for L <= {BMS_EXHAUSTIVE_MAX_SLICES} "
                f"(got B={self.budget}, L={slices}); use budget <= L or strategy='cyclic'"
            )

    def _normalized_prior(self):
        if self.deletion_prior is None:
            return None
        if self.strategy != "bms":
            raise ValueError("deletion_prior is only used by strategy='bms'")
        rows = list(self.deletion_prior)
        if rows and not isinstance(rows[0], (list, tuple)):
            rows = [rows]
        if len(rows) not in (1, self.num_shards):
            raise ValueError(
                f"deletion_prior needs 1 or num_shards={self.num_shards} rows, got {len(rows)}"
            )
        normalized = []
        for row in rows:
            row = tuple(float(p) for p in row)
            if len(row) != self.num_slices:
                raise ValueError(
                    f"each deletion_prior row needs num_slices={self.num_slices} values, got {len(row)}"
                )
            if any(p < 0 or not math.isfinite(p) for p in row) or abs(sum(row) - 1.0) > 1e-6:
                raise ValueError(f"deletion_prior rows must be probabilities summing to 1, got {row}")
            normalized.append(row)
        return tuple(normalized)

    def _normalized_blocks(self):
        if self.layer_blocks is None:
            return None
        blocks = tuple(tuple(int(i) for i in block) for block in self.layer_blocks)
        if len(blocks) != self.num_slices:
            raise ValueError(
                f"layer_blocks needs one block per slice (L={self.num_slices}), got {len(blocks)}"
            )
        seen: set[int] = set()
        for block in blocks:
            if not block:
                raise ValueError("every layer block needs at least one layer index")
            if any(i < 0 for i in block):
                raise ValueError(f"layer indices must be non-negative, got {block}")
            if seen.intersection(block) or len(set(block)) != len(block):
                raise ValueError(f"layer blocks must be disjoint, layer(s) repeated in {block}")
            seen.update(block)
        return blocks

    def prior_for_shard(self, shard: int) -> tuple:
        """Deletion odds of each slice of ``shard`` (uniform when no prior is given)."""
        if self.deletion_prior is None:
            return tuple(1.0 / self.num_slices for _ in range(self.num_slices))
        rows = self.deletion_prior
        return rows[0] if len(rows) == 1 else rows[shard]

    def to_dict(self) -> dict:
        """JSON-ready form; the LoRA recipe is stored as PEFT's own config dict."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "lora"}
        lora = self.lora.to_dict()
        data["lora"] = {k: sorted(v) if isinstance(v, set) else v for k, v in lora.items()}
        return json.loads(json.dumps(data))

    @classmethod
    def from_dict(cls, data: dict) -> "S3TConfig":
        data = dict(data)
        lora = LoraConfig.from_peft_type(**data.pop("lora"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown S3TConfig field(s): {sorted(unknown)}")
        return cls(lora=lora, **data)


def _check_choice(name: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
