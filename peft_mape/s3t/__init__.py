"""S3T: exact unlearning by sharded, sliced LoRA training (SPEC §6).

Shard the data into m shards of L slices; split the LoRA-carrying layers into L blocks, top
first; for each of B slice orders per shard, stage j trains only block j on the first j slices
of the order. Deleting an example deactivates the blocks trained on its slice, so each shard
falls back to its longest surviving prefix: exact unlearning with no retraining.

Sequence classifiers and (``S3TConfig(task="causal_lm")``) causal language models; the latter
serve the mean of the shards' next-token probabilities through ``S3TModel.as_causal_lm()``.
"""

from .causal_lm import S3TCausalLM
from .capacity import deletion_capacity, harmonic, simulate_deletion_capacity
from .config import S3TConfig
from .model import S3TModel
from .registry import ProvenanceRegistry
from .report import DeletionReport, OrderTruncation, StageInfo
from .sequences import bms_orders, cyclic_orders, select_orders, sequence_score

__all__ = [
    "DeletionReport",
    "OrderTruncation",
    "ProvenanceRegistry",
    "S3TCausalLM",
    "S3TConfig",
    "S3TModel",
    "StageInfo",
    "bms_orders",
    "cyclic_orders",
    "deletion_capacity",
    "harmonic",
    "select_orders",
    "sequence_score",
    "simulate_deletion_capacity",
]
