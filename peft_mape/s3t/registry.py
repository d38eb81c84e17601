"""Provenance registry: example id -> (shard, slice) -> stage adapters, so every deletion is provable.

Each slice carries a version that grows with every deletion from it. An adapter records the
(slice, version) pairs of the prefix it was trained on plus a digest of the exact ids used.
Deleting an id bumps its slice's version and revokes every adapter trained on an older version
of that slice; serving only looks up adapters keyed by *current* versions, so a revoked adapter
can never be served again, and a rebuilt one provably excludes the deleted ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

ExampleId = Union[int, str]
Prefix = tuple  # ((slice, version), ...)


@dataclass
class AdapterRecord:
    name: str
    shard: int
    prefix: Prefix
    block: int
    layers: tuple
    num_examples: int
    data_digest: str
    status: str = "active"
    revoked_by: tuple = ()


@dataclass(frozen=True)
class DeletionRecord:
    shard: int
    slice: int
    removed_at_version: int  # the first version of the slice without this id


@dataclass
class DeletionOutcome:
    deleted: list = field(default_factory=list)
    already_deleted: list = field(default_factory=list)
    revoked: list = field(default_factory=list)


def normalize_id(value) -> ExampleId:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"example ids must be int or str, got bool {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        return value
    raise ValueError(f"example ids must be int or str, got {type(value).__name__} {value!r}")


def ids_digest(ids: Sequence[ExampleId]) -> str:
    return hashlib.sha256(json.dumps(sorted(ids)).encode()).hexdigest()


def assign_balanced(ids: Sequence[ExampleId], num_shards: int, num_slices: int, seed: int) -> dict:
    """Seeded random partition into m·L slices whose sizes differ by at most one."""
    ordered = sorted(ids)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    assignment = {}
    for chunk_index, chunk in enumerate(np.array_split(permutation, num_shards * num_slices)):
        for row in chunk:
            assignment[ordered[int(row)]] = (chunk_index // num_slices, chunk_index % num_slices)
    return assignment


class ProvenanceRegistry:
    def __init__(self, num_shards: int, num_slices: int, orders: Sequence[Sequence[Sequence[int]]],
                 assignment: Mapping[ExampleId, Sequence[int]]):
        self.num_shards = num_shards
        self.num_slices = num_slices
        if len(orders) != num_shards:
            raise ValueError(f"need orders for {num_shards} shards, got {len(orders)}")
        self.orders = [[tuple(int(k) for k in order) for order in shard] for shard in orders]
        for shard_orders in self.orders:
            for order in shard_orders:
                if sorted(order) != list(range(num_slices)):
                    raise ValueError(f"order {order} is not a permutation of {num_slices} slices")
        self.assignment: dict = {}
        self._members: dict = {(s, k): [] for s in range(num_shards) for k in range(num_slices)}
        for raw_id, location in assignment.items():
            example_id = normalize_id(raw_id)
            shard, slice_ = (int(v) for v in location)
            if not (0 <= shard < num_shards and 0 <= slice_ < num_slices):
                raise ValueError(f"id {example_id!r} assigned to missing shard/slice {(shard, slice_)}")
            if example_id in self.assignment:
                raise ValueError(f"duplicate example id {example_id!r}")
            self.assignment[example_id] = (shard, slice_)
            self._members[(shard, slice_)].append(example_id)
        if len({type(i) for i in self.assignment}) > 1:
            raise ValueError("example ids must all be int or all be str")
        empty = [key for key, members in self._members.items() if not members]
        if empty:
            raise ValueError(f"every (shard, slice) needs at least one example; empty: {empty}")
        for members in self._members.values():
            members.sort()
        self.slice_versions = [[0] * num_slices for _ in range(num_shards)]
        self.deleted: dict = {}
        self.adapters: dict = {}

    # ----------------------------------------------------------------- lookups
    def location(self, example_id) -> tuple:
        example_id = normalize_id(example_id)
        if example_id not in self.assignment:
            raise KeyError(f"unknown example id {example_id!r}")
        return self.assignment[example_id]

    def is_active(self, example_id) -> bool:
        self.location(example_id)
        return normalize_id(example_id) not in self.deleted

    def active_ids(self, shard: Optional[int] = None, slice_: Optional[int] = None) -> list:
        return sorted(
            i for i, (s, k) in self.assignment.items()
            if i not in self.deleted and shard in (None, s) and slice_ in (None, k)
        )

    def slice_members(self, shard: int, slice_: int, version: int) -> list:
        """Ids that version ``version`` of the slice contains (assigned, not yet removed)."""
        return [
            i for i in self._members[(shard, slice_)]
            if i not in self.deleted or self.deleted[i].removed_at_version > version
        ]

    def stage_ids(self, shard: int, prefix: Prefix) -> list:
        return sorted(i for slice_, version in prefix for i in self.slice_members(shard, slice_, version))

    def current_prefix(self, shard: int, order_index: int, depth: int) -> Prefix:
        order = self.orders[shard][order_index]
        return tuple((k, self.slice_versions[shard][k]) for k in order[:depth])

    @staticmethod
    def adapter_name(shard: int, prefix: Prefix) -> str:
        return f"s{shard}_" + "-".join(f"{k}v{v}" for k, v in prefix)

    def is_live(self, name: str) -> bool:
        record = self.adapters.get(name)
        return record is not None and record.status == "active"

    def live_adapters(self) -> list:
        return [name for name, record in self.adapters.items() if record.status == "active"]

    def served_depth(self, shard: int, order_index: int) -> int:
        depth = 0
        for d in range(1, self.num_slices + 1):
            if not self.is_live(self.adapter_name(shard, self.current_prefix(shard, order_index, d))):
                break
            depth = d
        return depth

    def served_prefix(self, shard: int) -> tuple:
        """(order index, depth) of the shard's longest surviving prefix; ties go to the lower index."""
        depths = [self.served_depth(shard, b) for b in range(len(self.orders[shard]))]
        best = int(np.argmax(depths))
        return best, depths[best]

    # ----------------------------------------------------------------- updates
    def record_adapter(self, name: str, shard: int, prefix: Prefix, block: int, layers: Sequence[int],
                       ids: Sequence[ExampleId]) -> AdapterRecord:
        if self.is_live(name):
            raise ValueError(f"adapter {name!r} is already recorded as active")
        record = AdapterRecord(name, shard, tuple(tuple(p) for p in prefix), block, tuple(layers),
                               len(ids), ids_digest(ids))
        self.adapters[name] = record
        return record

    def delete(self, ids: Iterable) -> DeletionOutcome:
        """Remove ids; unknown ids raise ``KeyError`` before anything changes, and ids that
        were already deleted are a no-op reported in ``already_deleted``."""
        if isinstance(ids, (str, int, np.integer)):
            ids = [ids]
        requested = list(dict.fromkeys(normalize_id(i) for i in ids))
        unknown = [i for i in requested if i not in self.assignment]
        if unknown:
            raise KeyError(f"unknown example id(s): {unknown[:10]}" + (" …" if len(unknown) > 10 else ""))
        outcome = DeletionOutcome()
        by_slice: dict = {}
        for example_id in requested:
            if example_id in self.deleted:
                outcome.already_deleted.append(example_id)
            else:
                by_slice.setdefault(self.assignment[example_id], []).append(example_id)
        for (shard, slice_), slice_ids in sorted(by_slice.items()):
            new_version = self.slice_versions[shard][slice_] + 1
            self.slice_versions[shard][slice_] = new_version
            for example_id in slice_ids:
                self.deleted[example_id] = DeletionRecord(shard, slice_, new_version)
            outcome.deleted.extend(slice_ids)
            for record in self.adapters.values():
                if record.status == "active" and record.shard == shard and any(
                    k == slice_ and v < new_version for k, v in record.prefix
                ):
                    record.status = "revoked"
                    record.revoked_by = tuple(record.revoked_by) + tuple(slice_ids)
                    outcome.revoked.append(record.name)
        return outcome

    def adapters_trained_on(self, example_id) -> list:
        """Names of all recorded adapters (live or revoked) whose training data held the id."""
        example_id = normalize_id(example_id)
        shard, slice_ = self.location(example_id)
        removed = self.deleted[example_id].removed_at_version if example_id in self.deleted else None
        return [
            record.name for record in self.adapters.values()
            if record.shard == shard
            and any(k == slice_ and (removed is None or v < removed) for k, v in record.prefix)
        ]

    # ----------------------------------------------------------------- proof
    def prove_deleted(self, example_id) -> dict:
        """Evidence that no live adapter was trained on ``example_id``.

        For every live adapter of the id's shard, the training set is rebuilt from the recorded
        (slice, version) pairs, checked against the digest stored at training time, and checked
        not to contain the id. Raises ``RuntimeError`` if any check fails.
        """
        example_id = normalize_id(example_id)
        self.location(example_id)
        if example_id not in self.deleted:
            raise ValueError(f"example id {example_id!r} has not been deleted")
        record = self.deleted[example_id]
        checked = []
        for adapter in self.adapters.values():
            if adapter.status != "active" or adapter.shard != record.shard:
                continue
            ids = self.stage_ids(adapter.shard, adapter.prefix)
            if ids_digest(ids) != adapter.data_digest:
                raise RuntimeError(f"adapter {adapter.name!r}: recorded training data does not match its digest")
            if example_id in ids:
                raise RuntimeError(f"live adapter {adapter.name!r} was trained on deleted id {example_id!r}")
            checked.append(adapter.name)
        return {"id": example_id, "shard": record.shard, "slice": record.slice,
                "removed_at_version": record.removed_at_version, "live_adapters_checked": checked,
                "guarantee": "exact"}

    # ----------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        return {
            "num_shards": self.num_shards,
            "num_slices": self.num_slices,
            "orders": [[list(o) for o in shard] for shard in self.orders],
            "assignment": [[i, s, k] for i, (s, k) in sorted(self.assignment.items())],
            "slice_versions": [list(v) for v in self.slice_versions],
            "deleted": [[i, r.shard, r.slice, r.removed_at_version] for i, r in sorted(self.deleted.items())],
            "adapters": [
                {**asdict(r), "prefix": [list(p) for p in r.prefix], "layers": list(r.layers),
                 "revoked_by": list(r.revoked_by)}
                for r in self.adapters.values()
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "ProvenanceRegistry":
        registry = cls(data["num_shards"], data["num_slices"], data["orders"],
                       {i: (s, k) for i, s, k in data["assignment"]})
        registry.slice_versions = [list(v) for v in data["slice_versions"]]
        registry.deleted = {i: DeletionRecord(s, k, v) for i, s, k, v in data["deleted"]}
        for raw in data["adapters"]:
            record = AdapterRecord(**{**raw, "prefix": tuple(tuple(p) for p in raw["prefix"]),
                                      "layers": tuple(raw["layers"]), "revoked_by": tuple(raw["revoked_by"])})
            registry.adapters[record.name] = record
        return registry
