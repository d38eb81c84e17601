"""Plain records returned to users: what a deletion did, and what a training stage was."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OrderTruncation:
    """One slice order of a shard lost depth: it now serves ``depth_after`` of L blocks."""

    shard: int
    order_index: int
    order: tuple
    depth_before: int
    depth_after: int


@dataclass(frozen=True)
class DeletionReport:
    """Outcome of ``S3TModel.delete``.

    ``guarantee`` is ``"exact"``: every served adapter was trained on data that never contained
    the deleted ids (see ``ProvenanceRegistry.prove_deleted``). ``failed_shards`` have no surviving
    prefix and are left out of predictions until ``retrain_failed()`` rebuilds them.
    """

    deleted: tuple
    already_deleted: tuple
    revoked_adapters: tuple
    truncated: tuple  # OrderTruncation records
    served: dict  # shard -> (order index, depth) after the deletion
    failed_shards: tuple
    latency_s: float
    guarantee: str = "exact"

    @property
    def shards_affected(self) -> tuple:
        return tuple(sorted({t.shard for t in self.truncated}))

    @property
    def needs_retraining(self) -> bool:
        return bool(self.failed_shards)


@dataclass(frozen=True)
class StageInfo:
    """A trained stage, passed to ``on_stage_end`` callbacks.

    At callback time the model is in eval mode with exactly this stage's prefix of adapters
    active and the stage's head loaded, i.e. the state served for this prefix.
    """

    adapter: str
    shard: int
    prefix: tuple  # ((slice, version), ...)
    block: int
    layers: tuple
    example_ids: tuple
    mean_loss: float
