import json
from collections import Counter

import pytest

from peft_mape.s3t import ProvenanceRegistry
from peft_mape.s3t.registry import assign_balanced

ORDERS = [[(0, 1, 2), (1, 2, 0)], [(0, 1, 2), (1, 2, 0)]]


def _registry(ids=range(60)):
    registry = ProvenanceRegistry(2, 3, ORDERS, assign_balanced(list(ids), 2, 3, seed=0))
    # Record every stage as trained on the current data, the way S3TModel does.
    for shard in range(2):
        for order_index in range(2):
            for depth in range(1, 4):
                prefix = registry.current_prefix(shard, order_index, depth)
                name = registry.adapter_name(shard, prefix)
                if not registry.is_live(name):
                    registry.record_adapter(name, shard, prefix, depth - 1, [3 - depth],
                                            registry.stage_ids(shard, prefix))
    return registry


def test_balanced_assignment_is_deterministic_and_complete():
    ids = list(range(100))
    assignment = assign_balanced(ids, 3, 4, seed=5)
    assert assignment == assign_balanced(list(reversed(ids)), 3, 4, seed=5)
    assert sorted(assignment) == ids
    sizes = Counter(assignment.values())
    assert len(sizes) == 12 and max(sizes.values()) - min(sizes.values()) <= 1
    assert assignment != assign_balanced(ids, 3, 4, seed=6)


def test_delete_bumps_the_slice_version_and_revokes_dependent_adapters():
    registry = _registry()
    victim = registry.active_ids(shard=0, slice_=1)[0]
    outcome = registry.delete([victim])
    assert outcome.deleted == [victim] and outcome.already_deleted == []
    assert registry.slice_versions == [[0, 1, 0], [0, 0, 0]]
    # Order (0,1,2) keeps depth 1; order (1,2,0) starts with slice 1 and loses everything.
    assert sorted(outcome.revoked) == ["s0_0v0-1v0", "s0_0v0-1v0-2v0", "s0_1v0", "s0_1v0-2v0", "s0_1v0-2v0-0v0"]
    assert sorted(registry.adapters_trained_on(victim)) == sorted(outcome.revoked)
    assert all(registry.adapters[n].status == "revoked" for n in registry.adapters_trained_on(victim))
    assert registry.served_depth(0, 0) == 1 and registry.served_depth(0, 1) == 0
    assert registry.served_prefix(0) == (0, 1)
    assert registry.served_prefix(1) == (0, 3)


def test_registry_never_lists_deleted_ids_as_active():
    registry = _registry()
    victims = [registry.active_ids(shard=s, slice_=k)[0] for s in range(2) for k in range(3)]
    registry.delete(victims)
    active = set(registry.active_ids())
    assert active.isdisjoint(victims) and len(active) == 60 - len(victims)
    assert not any(registry.is_active(v) for v in victims)
    for name in registry.live_adapters():
        record = registry.adapters[name]
        assert set(registry.stage_ids(record.shard, record.prefix)).isdisjoint(victims)
    for victim in victims:
        proof = registry.prove_deleted(victim)
        assert proof["guarantee"] == "exact" and proof["removed_at_version"] == 1


def test_deleting_twice_is_a_reported_no_op_and_unknown_ids_change_nothing():
    registry = _registry()
    victim = registry.active_ids(shard=1, slice_=2)[0]
    registry.delete([victim])
    snapshot = json.dumps(registry.to_dict())
    again = registry.delete([victim, victim])
    assert again.deleted == [] and again.already_deleted == [victim] and again.revoked == []
    assert json.dumps(registry.to_dict()) == snapshot
    other = registry.active_ids(shard=0, slice_=0)[0]
    with pytest.raises(KeyError, match="unknown example id"):
        registry.delete([other, 10_000])
    assert json.dumps(registry.to_dict()) == snapshot  # the valid id was not deleted either
    with pytest.raises(KeyError):
        registry.location("nope")


def test_prove_deleted_detects_a_tampered_record():
    registry = _registry()
    victim = registry.active_ids(shard=0, slice_=2)[0]
    registry.delete(victim)
    live = [n for n in registry.live_adapters() if registry.adapters[n].shard == 0]
    registry.adapters[live[0]].data_digest = "0" * 64
    with pytest.raises(RuntimeError, match="digest"):
        registry.prove_deleted(victim)
    with pytest.raises(ValueError, match="has not been deleted"):
        registry.prove_deleted(registry.active_ids(shard=0, slice_=0)[0])


def test_json_round_trip_keeps_string_ids_versions_and_statuses():
    registry = _registry([f"tweet-{i}" for i in range(30)])
    victim = registry.active_ids(shard=0, slice_=0)[0]
    registry.delete([victim])
    restored = ProvenanceRegistry.from_dict(json.loads(json.dumps(registry.to_dict())))
    assert restored.to_dict() == registry.to_dict()
    assert not restored.is_active(victim)
    assert restored.live_adapters() == registry.live_adapters()
    assert restored.served_prefix(0) == registry.served_prefix(0)


def test_bad_assignments_are_rejected():
    with pytest.raises(ValueError, match="empty"):
        ProvenanceRegistry(1, 2, [[(0, 1)]], {1: (0, 0), 2: (0, 0)})
    with pytest.raises(ValueError, match="all be int or all be str"):
        ProvenanceRegistry(1, 2, [[(0, 1)]], {1: (0, 0), "2": (0, 1)})
    with pytest.raises(ValueError, match="missing shard/slice"):
        ProvenanceRegistry(1, 2, [[(0, 1)]], {1: (0, 0), 2: (1, 1)})
    with pytest.raises(ValueError, match="not a permutation"):
        ProvenanceRegistry(1, 2, [[(0, 0)]], {1: (0, 0), 2: (0, 1)})
    with pytest.raises(ValueError, match="int or str"):
        ProvenanceRegistry(1, 2, [[(0, 1)]], {1.5: (0, 0), 2: (0, 1)})
