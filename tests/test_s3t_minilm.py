"""S3T on the real all-MiniLM-L6-v2 checkpoint and tweets (slow: ~20 s on one CPU thread)."""

import pytest
import torch
from peft import LoraConfig

from mape_devkit import assets
from peft_mape.s3t import S3TConfig, S3TModel

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _minilm():
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(assets.minilm_dir(), num_labels=3)


def test_minilm_deletion_is_exact_and_survives_save_load(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_dir())
    tweets = assets.load_tweets().shuffle(seed=0).select(range(132))
    train = tweets.select(range(120)).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=32), batched=True
    )
    probe = dict(tokenizer(list(tweets.select(range(120, 132))["text"]), truncation=True, max_length=32,
                           padding=True, return_tensors="pt"))
    snapshots = {}

    def record(info, s3t):
        with torch.no_grad():
            snapshots[info.adapter] = s3t.model(**probe).logits.clone()

    torch.manual_seed(0)
    config = S3TConfig(lora=LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]), num_shards=2,
                       num_slices=3, budget=2, batch_size=16, learning_rate=2e-3)
    s3t = S3TModel(_minilm(), config)
    assert s3t.blocks == [(5, 4), (3, 2), (1, 0)]
    s3t.fit(train, on_stage_end=record, progress=False)
    assert len(snapshots) == 12

    victim = s3t.registry.active_ids(shard=1, slice_=0)[0]
    report = s3t.delete(victim)
    assert report.failed_shards == () and report.latency_s < 5.0
    order_index, depth = report.served[1]
    assert 0 not in s3t.registry.orders[1][order_index][:depth]
    served = s3t.registry.adapter_name(1, s3t.registry.current_prefix(1, order_index, depth))
    assert torch.equal(s3t.shard_logits(1, probe), snapshots[served])

    path = s3t.save(tmp_path / "minilm-s3t")
    torch.manual_seed(123)  # a different random classifier init in the fresh base model
    restored = S3TModel.load(path, _minilm())
    assert torch.equal(restored.predict_scores(probe), s3t.predict_scores(probe))
    assert victim not in restored.registry.active_ids()
    restored.registry.prove_deleted(victim)
