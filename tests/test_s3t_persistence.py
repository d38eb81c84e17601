"""Saving and reloading an S3TModel: adapters, head snapshots and the provenance registry."""

import json
import os

import datasets
import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file

from conftest import s3t_bert
from peft_mape.s3t import S3TConfig, S3TModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n=40):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 64, (n, 6), generator=generator)
    return datasets.Dataset.from_dict(
        {"id": [f"ex{i}" for i in range(n)], "input_ids": tokens.tolist(), "label": (tokens[:, 0] % 3).tolist()}
    )


PROBE = {"input_ids": torch.randint(1, 64, (4, 6), generator=torch.Generator().manual_seed(3))}


@pytest.fixture
def trained():
    config = S3TConfig(lora=LoraConfig(r=2, target_modules=["query", "value"]), num_shards=2, num_slices=2,
                       budget=2, batch_size=8, learning_rate=1e-2)
    return S3TModel(s3t_bert(4), config).fit(_dataset(), progress=False)


def _reloaded(path):
    model = s3t_bert(4)
    with torch.no_grad():  # a different head init proves the snapshots are restored from disk
        model.classifier.weight.normal_()
    return S3TModel.load(path, model)


def test_round_trip_is_bit_exact_and_keeps_the_registry(trained, tmp_path):
    victim = trained.registry.active_ids(shard=1, slice_=1)[0]
    trained.delete(victim)
    path = trained.save(tmp_path / "s3t")
    restored = _reloaded(path)
    assert restored.registry.to_dict() == trained.registry.to_dict()
    assert restored.served_prefixes() == trained.served_prefixes()
    for shard in range(2):
        assert torch.equal(restored.shard_logits(shard, PROBE), trained.shard_logits(shard, PROBE))
    assert torch.equal(restored.predict_scores(PROBE), trained.predict_scores(PROBE))
    assert not restored.registry.is_active(victim) and victim not in restored.registry.active_ids()
    restored.registry.prove_deleted(victim)


def test_only_live_adapters_are_written_in_peft_layout(trained, tmp_path):
    report = trained.delete(trained.registry.active_ids(shard=0, slice_=0)[0])
    path = trained.save(tmp_path / "s3t")
    on_disk = sorted(os.listdir(path / "adapters"))
    assert on_disk == sorted(trained.registry.live_adapters())
    assert set(report.revoked_adapters).isdisjoint(on_disk)
    meta = json.loads((path / "s3t.json").read_text())
    statuses = {a["name"]: a["status"] for a in meta["registry"]["adapters"]}
    assert all(statuses[name] == "revoked" for name in report.revoked_adapters)
    adapter_dir = path / "adapters" / on_disk[0]
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and all(".layer." in m for m in config["target_modules"])
    assert all(k.endswith("weight") for k in load_file(str(adapter_dir / "adapter_model.safetensors")))
    heads = load_file(str(path / "heads.safetensors"))
    assert {k.split("/")[0] for k in heads} == {"initial", *trained.registry.live_adapters()}


def test_saving_again_replaces_atomically(trained, tmp_path):
    path = trained.save(tmp_path / "s3t")
    trained.delete(trained.registry.active_ids(shard=1, slice_=0)[0])
    trained.save(path)
    assert sorted(os.listdir(tmp_path)) == ["s3t"]  # no temporary or backup directories left
    assert sorted(os.listdir(path / "adapters")) == sorted(trained.registry.live_adapters())


def test_retraining_after_load_needs_the_dataset(trained, tmp_path):
    trained.delete(trained.registry.active_ids(shard=0, slice_=1)[0])
    restored = _reloaded(trained.save(tmp_path / "s3t"))
    with pytest.raises(ValueError, match="pass the training dataset"):
        restored.retrain_failed()
    rebuilt = restored.retrain_failed(_dataset(), progress=False)
    reference = trained.retrain_failed(progress=False)
    assert rebuilt == reference
    assert torch.equal(restored.predict_scores(PROBE), trained.predict_scores(PROBE))


def test_loading_onto_another_base_model_is_refused(trained, tmp_path):
    path = trained.save(tmp_path / "s3t")
    with pytest.raises(ValueError, match="fingerprint"):
        S3TModel.load(path, s3t_bert(4, seed=1))
    with pytest.raises(ValueError, match="not a saved S3TModel"):
        S3TModel.load(tmp_path, s3t_bert(4))
