"""Training, serving, deletion and retraining of S3TModel on a tiny random BERT."""

import copy

import datasets
import pytest
import torch
from peft import LoraConfig

from conftest import s3t_bert
from peft_mape.s3t import S3TConfig, S3TModel
from peft_mape.s3t.aggregation import aggregate
from peft_mape.s3t.blocks import layer_index

HEAD = ("classifier.weight", "classifier.bias")

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n=72, seed=0):
    """Each class draws its tokens from its own third of the vocabulary, so it is learnable."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=generator)
    tokens = 1 + labels[:, None] * 21 + torch.randint(0, 21, (n, 8), generator=generator)
    lengths = torch.randint(4, 9, (n,), generator=generator).tolist()  # ragged rows exercise padding
    return datasets.Dataset.from_dict({
        "id": [1000 + i for i in range(n)],
        "input_ids": [row[:k] for row, k in zip(tokens.tolist(), lengths)],
        "attention_mask": [[1] * k for k in lengths],
        "label": labels.tolist(),
    })


PROBE = {"input_ids": torch.randint(1, 64, (5, 7), generator=torch.Generator().manual_seed(9)),
         "attention_mask": torch.ones(5, 7, dtype=torch.long)}


def _config(**kwargs):
    base = dict(lora=LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.1),
                num_shards=2, num_slices=3, budget=2, batch_size=8, epochs_per_stage=2, learning_rate=5e-3)
    return S3TConfig(**{**base, **kwargs})


class Recorder:
    """on_stage_end callback keeping what each stage looked like when it was trained."""

    def __init__(self, keep_state=False):
        self.keep_state = keep_state
        self.stages, self.logits, self.states, self.ids = [], {}, {}, {}

    def __call__(self, info, s3t):
        self.stages.append(info)
        self.ids[info.adapter] = info.example_ids
        with torch.no_grad():
            self.logits[info.adapter] = s3t.model(**PROBE).logits.clone()
        if self.keep_state:
            self.states[info.adapter] = {k: v.clone() for k, v in s3t.model.state_dict().items()}


def _fit(config=None, dataset=None, keep_state=False, **fit_kwargs):
    recorder = Recorder(keep_state)
    s3t = S3TModel(s3t_bert(6), config or _config())
    s3t.fit(dataset or _dataset(), on_stage_end=recorder, progress=False, **fit_kwargs)
    return s3t, recorder


@pytest.fixture(scope="module")
def trained():
    # Same thread count as the tests that compare against it, so float reductions match.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fit(keep_state=True)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def fresh(trained):
    """A private copy of the module's trained model, free to be mutated by deletions."""
    s3t, recorder = trained
    return copy.deepcopy(s3t), recorder


def _served_adapter(s3t, shard):
    order_index, depth = s3t.served_prefixes()[shard]
    return s3t.registry.adapter_name(shard, s3t.registry.current_prefix(shard, order_index, depth))


def test_fit_trains_every_shard_order_and_stage(trained):
    s3t, recorder = trained
    assert len(recorder.stages) == 2 * 2 * 3 == len(s3t.registry.live_adapters())
    assert s3t.served_prefixes() == {0: (0, 3), 1: (0, 3)}
    assert set(s3t.model.peft_config) == set(s3t.registry.live_adapters())
    for info in recorder.stages:
        order_slices = [k for k, _ in info.prefix]
        expected = sorted(s3t.registry.stage_ids(info.shard, info.prefix))
        assert sorted(info.example_ids) == expected
        assert {s3t.registry.location(i) for i in info.example_ids} == {(info.shard, k) for k in order_slices}
    # Training moved every adapter off its no-op init (LoRA B starts at zero), so the bit-for-bit
    # comparisons below cannot pass merely because adapters do nothing.
    for name in s3t.registry.live_adapters():
        lora_b = [p for n, p in s3t.model.named_parameters() if "lora_B" in n and name in n.split(".")]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    stage_logits = list(recorder.logits.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(stage_logits) for b in stage_logits[i + 1:])


def test_shared_prefixes_are_trained_once():
    s3t, recorder = _fit(_config(num_shards=1, budget=4))
    orders = s3t.registry.orders[0]
    assert orders[0][:1] == orders[3][:1] == (0,)
    assert len(recorder.stages) == 4 * 3 - 1
    assert len({info.adapter for info in recorder.stages}) == 11


def _canonical(state):
    """State dict keys as in the plain model (PEFT moves a wrapped weight to ``base_layer``)."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def test_each_stage_changes_only_its_block(trained):
    s3t, recorder = trained
    base = s3t_bert(6).state_dict()
    previous = dict(base)
    for info in recorder.stages:
        state = _canonical(recorder.states[info.adapter])
        changed = {k for k in previous if k in state and not torch.equal(previous[k], state[k])}
        assert changed <= set(HEAD), (info.adapter, changed - set(HEAD))
        added = set(state) - set(previous)
        assert added and all(info.adapter in k.split(".") for k in added)
        assert {layer_index(k) for k in added} == set(info.layers)
        assert list(info.layers) == list(s3t.blocks[len(info.prefix) - 1])
        for k in base:
            if k not in HEAD and k in state:  # base weights never move
                assert torch.equal(base[k], state[k])
        previous = state


def test_deleting_falls_back_to_the_stage_snapshot_bit_for_bit(fresh):
    s3t, recorder = fresh
    victim = s3t.registry.active_ids(shard=0, slice_=1)[0]
    untouched = s3t.shard_logits(1, PROBE)
    report = s3t.delete([victim])
    assert report.guarantee == "exact" and report.deleted == (victim,) and report.failed_shards == ()
    # Order (0,1,2) keeps depth 1; order (1,2,0) keeps nothing: slice 1 is its first slice.
    truncations = {(t.order, t.depth_before, t.depth_after) for t in report.truncated}
    assert truncations == {((0, 1, 2), 3, 1), ((1, 2, 0), 3, 0)}
    assert report.shards_affected == (0,) and report.served[0] == (0, 1)
    served = _served_adapter(s3t, 0)
    assert served == "s0_0v0" and victim not in recorder.ids[served]
    assert torch.equal(s3t.shard_logits(0, PROBE), recorder.logits[served])
    assert not torch.equal(recorder.logits[served], recorder.logits["s0_0v0-1v0-2v0"])
    assert torch.equal(s3t.shard_logits(1, PROBE), untouched)
    assert torch.equal(s3t.shard_logits(1, PROBE), recorder.logits[_served_adapter(s3t, 1)])
    expected = aggregate([recorder.logits[served], recorder.logits[_served_adapter(s3t, 1)]], "mean_logits")
    assert torch.equal(s3t.predict_scores(PROBE), expected)
    assert s3t.registry.prove_deleted(victim)["live_adapters_checked"]


def test_served_model_equals_training_from_scratch_without_the_deleted_example(fresh):
    s3t, _ = fresh
    victim = s3t.registry.active_ids(shard=0, slice_=2)[0]
    assignment = {i: loc for i, loc in s3t.registry.assignment.items() if i != victim}
    s3t.delete(victim)
    order_index, depth = s3t.served_prefixes()[0]
    assert depth == 2  # order (0,1,2) loses only its last stage
    without = _dataset().filter(lambda row: row["id"] != victim)
    scratch, _ = _fit(dataset=without, assignment=assignment)
    assert torch.equal(s3t.stage_logits(0, order_index, depth, PROBE),
                       scratch.stage_logits(0, order_index, depth, PROBE))
    assert torch.equal(s3t.shard_logits(1, PROBE), scratch.shard_logits(1, PROBE))


def test_failed_shard_is_reported_dropped_and_rebuilt(fresh):
    s3t, _ = fresh
    firsts = {order[0] for order in s3t.registry.orders[0]}
    victims = [s3t.registry.active_ids(shard=0, slice_=k)[0] for k in sorted(firsts)]
    report = s3t.delete(victims)
    assert report.failed_shards == (0,) and report.needs_retraining
    with pytest.raises(RuntimeError, match="shard 0 has no surviving prefix"):
        s3t.shard_logits(0, PROBE)
    assert torch.equal(s3t.predict_scores(PROBE), s3t.shard_logits(1, PROBE))
    depths = {(t.shard, t.order_index): t.depth_after for t in report.truncated}
    rebuilt_stages = Recorder()
    rebuilt = s3t.retrain_failed(on_stage_end=rebuilt_stages, progress=False)
    expected = {
        s3t.registry.adapter_name(s, s3t.registry.current_prefix(s, b, d))
        for (s, b), after in depths.items() for d in range(after + 1, 4)
    }
    assert set(rebuilt) == expected and len(rebuilt) == len(expected)  # only truncated suffixes
    assert all(info.shard == 0 for info in rebuilt_stages.stages)
    for info in rebuilt_stages.stages:
        assert set(info.example_ids).isdisjoint(victims)
    assert s3t.served_prefixes() == {0: (0, 3), 1: (0, 3)}
    for victim in victims:
        assert not s3t.registry.is_active(victim)
        s3t.registry.prove_deleted(victim)


def test_deleting_twice_and_unknown_ids(fresh):
    s3t, _ = fresh
    victim = s3t.registry.active_ids(shard=1, slice_=0)[0]
    s3t.delete(victim)
    depths = s3t.served_prefixes()
    again = s3t.delete([victim])
    assert again.deleted == () and again.already_deleted == (victim,) and again.truncated == ()
    assert s3t.served_prefixes() == depths
    live = s3t.registry.live_adapters()
    with pytest.raises(KeyError, match="unknown example id"):
        s3t.delete([s3t.registry.active_ids()[0], -5])
    assert s3t.registry.live_adapters() == live and len(s3t.registry.deleted) == 1


def test_stage_logits_rejects_revoked_depths(fresh):
    s3t, recorder = fresh
    assert torch.equal(s3t.stage_logits(0, 1, 2, PROBE), recorder.logits["s0_1v0-2v0"])
    s3t.delete(s3t.registry.active_ids(shard=0, slice_=1)[0])  # the first slice of order 1
    with pytest.raises(ValueError, match="serves depth 0"):
        s3t.stage_logits(0, 1, 1, PROBE)
    with pytest.raises(ValueError, match="no order 5"):
        s3t.stage_logits(0, 5, 1, PROBE)


def test_user_rng_state_is_untouched_by_training():
    state = torch.random.get_rng_state()
    _fit(_config(num_shards=1, num_slices=2, budget=1))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("head", ["first_stage", "frozen"])
def test_head_modes_snapshot_the_head_as_documented(head):
    s3t, recorder = _fit(_config(num_shards=1, budget=1, head=head), keep_state=True)
    initial = s3t_bert(6).state_dict()
    first, second, third = recorder.stages
    for name in HEAD:
        if head == "frozen":
            assert torch.equal(recorder.states[first.adapter][name], initial[name])
        else:
            assert not torch.equal(recorder.states[first.adapter][name], initial[name])
        assert torch.equal(recorder.states[second.adapter][name], recorder.states[first.adapter][name])
        assert torch.equal(recorder.states[third.adapter][name], recorder.states[first.adapter][name])
    assert torch.equal(s3t.shard_logits(0, PROBE), recorder.logits[third.adapter])


@pytest.mark.parametrize("aggregation", ["mean_probs", "vote"])
def test_aggregation_modes(fresh, aggregation):
    s3t, _ = fresh
    s3t.config.aggregation = aggregation
    scores = s3t.predict_scores(PROBE)
    assert torch.allclose(scores.sum(dim=-1), torch.ones(len(scores)))
    if aggregation == "vote":
        assert set(scores.flatten().tolist()) <= {0.0, 0.5, 1.0}
    shard_preds = torch.stack([s3t.shard_logits(s, PROBE).argmax(-1) for s in range(2)])
    agree = shard_preds[0] == shard_preds[1]
    assert torch.equal(s3t.predict(PROBE)[agree], shard_preds[0][agree])


def test_dataset_predictions_keep_row_order(trained):
    s3t, _ = trained
    data = _dataset(20, seed=4)
    scores = s3t.predict_scores(data)  # batched by length internally, returned in dataset order
    for row, expected in zip(data, scores):
        single = s3t.predict_scores({"input_ids": torch.tensor([row["input_ids"]])})
        assert torch.allclose(single[0], expected, atol=1e-5)
    assert torch.equal(s3t.predict(data), scores.argmax(-1))
    assert s3t.evaluate(data) == float((scores.argmax(-1) == torch.tensor(data["label"])).float().mean())


def test_bad_inputs_give_clear_errors():
    s3t = S3TModel(s3t_bert(6), _config())
    with pytest.raises(ValueError, match="not fitted"):
        s3t.predict(PROBE)
    with pytest.raises(ValueError, match="stable id column 'id'"):
        s3t.fit(_dataset().remove_columns("id"), progress=False)
    with pytest.raises(ValueError, match="unique"):
        s3t.fit(datasets.concatenate_datasets([_dataset(8), _dataset(8)]), progress=False)
    with pytest.raises(ValueError, match="cannot fill"):
        s3t.fit(_dataset(5), progress=False)
    with pytest.raises(ValueError, match="label column"):
        s3t.fit(_dataset().remove_columns("label"), progress=False)
    small, _ = _fit(_config(num_shards=1, num_slices=2, budget=1), dataset=_dataset(8))
    with pytest.raises(ValueError, match="already fitted"):
        small.fit(_dataset(8), progress=False)
    with pytest.raises(ValueError, match="unknown shard"):
        small.retrain_failed(shards=[3])
    small.delete(small.registry.active_ids(slice_=0)[0])
    with pytest.raises(KeyError, match="lacks example id"):
        small.retrain_failed(_dataset(8).select(range(4)), progress=False)
