import json

import pytest
from peft import LoraConfig

from peft_mape.s3t import S3TConfig


def test_config_round_trips_through_json():
    config = S3TConfig(
        lora=LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.1),
        num_shards=3, num_slices=4, budget=2, strategy="bms", deletion_prior=[0.4, 0.3, 0.2, 0.1],
        expected_deletions=5, layer_blocks=[[5], [4, 3], [2, 1], [0]], head="first_stage",
        aggregation="vote", seed=7,
    )
    restored = S3TConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.lora.target_modules == {"query", "value"}
    assert restored.layer_blocks == ((5,), (4, 3), (2, 1), (0,))
    assert restored.deletion_prior == ((0.4, 0.3, 0.2, 0.1),)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_shards": 0}, "num_shards"),
        ({"num_slices": 2.0}, "num_slices"),
        ({"budget": True}, "budget"),
        ({"strategy": "random"}, "strategy"),
        ({"head": "shared"}, "head"),
        ({"aggregation": "max"}, "aggregation"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"head_modules": ()}, "head_modules"),
        ({"layer_blocks": [[1], []]}, "at least one"),
        ({"lora": {"r": 8}}, "peft.LoraConfig"),
    ],
)
def test_bad_config_values_name_the_field(kwargs, message):
    args = {"lora": LoraConfig(target_modules=["query"]), "num_slices": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        S3TConfig(**args)


def test_unknown_fields_in_saved_config_are_rejected():
    data = S3TConfig(lora=LoraConfig()).to_dict()
    data["slices"] = 3
    with pytest.raises(ValueError, match="slices"):
        S3TConfig.from_dict(data)
