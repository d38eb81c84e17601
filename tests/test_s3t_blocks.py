import datasets
import pytest
import torch
from peft import LoraConfig

from conftest import s3t_bert
from peft_mape.s3t import S3TConfig, S3TModel
from peft_mape.s3t.blocks import layer_index, split_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(**kwargs):
    base = dict(lora=LoraConfig(r=2, target_modules=["query", "value"]), num_shards=1, num_slices=4,
                batch_size=8)
    return S3TConfig(**{**base, **kwargs})


def _dataset(n=24):
    ids = torch.randint(1, 64, (n, 6), generator=torch.Generator().manual_seed(0))
    return datasets.Dataset.from_dict(
        {"id": list(range(n)), "input_ids": ids.tolist(), "label": (ids[:, 1] % 3).tolist()}
    )


@pytest.mark.parametrize(
    "name,pattern,expected",
    [
        ("bert.encoder.layer.1.attention.self.query", None, 1),
        ("bert.encoder.layer.10.attention.self.query", None, 10),
        ("bert.encoder.layer.19.output.dense", "layer", 19),
        ("model.layers.11.mlp.up_proj", None, 11),
        ("transformer.h.12.attn.c_attn", "h", 12),
        ("model.layers.3.experts.7.w1", "layers", 3),
        ("bert.pooler.dense", None, None),
        ("classifier", None, None),
        ("model.layers.11.mlp.up_proj", "layer", None),
    ],
)
def test_layer_index_is_parsed_as_an_integer(name, pattern, expected):
    assert layer_index(name, pattern) == expected


def test_split_layers_top_block_first():
    assert split_layers(range(12), 4) == [(11, 10, 9), (8, 7, 6), (5, 4, 3), (2, 1, 0)]
    assert split_layers(range(10), 3) == [(9, 8, 7, 6), (5, 4, 3), (2, 1, 0)]
    with pytest.raises(ValueError, match="only 2 layer"):
        split_layers([0, 1], 3)


def test_default_blocks_of_a_12_layer_model_partition_the_targets_exactly():
    s3t = S3TModel(s3t_bert(12), _config())
    assert s3t.blocks == [(11, 10, 9), (8, 7, 6), (5, 4, 3), (2, 1, 0)]
    for block, modules in zip(s3t.blocks, s3t.block_modules):
        assert len(modules) == 2 * len(block)
        assert {layer_index(m) for m in modules} == set(block)
    flat = [m for modules in s3t.block_modules for m in modules]
    assert len(flat) == len(set(flat)) == 24


def test_layer_1_block_never_touches_layers_10_to_19():
    model = s3t_bert(12)
    names = [n for n, _ in model.named_modules() if n.endswith(("query", "value"))]
    # The official substring match would have put six modules (layers 1, 10, 11) in this block.
    assert sum("layer.1" in n for n in names) == 6
    s3t = S3TModel(model, _config(layer_blocks=[[11, 10], [1], [9, 8, 7, 6, 5, 4], [3, 2, 0]]))
    assert s3t.block_modules[1] == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.value",
    ]
    s3t.fit(_dataset(), progress=False)
    for record in s3t.registry.adapters.values():
        lora_params = [n for n, _ in s3t.model.named_parameters() if record.name in n.split(".")]
        assert lora_params, record.name
        assert {layer_index(n) for n in lora_params} == set(s3t.blocks[record.block])


def test_blocks_reject_layers_without_lora_and_too_many_slices():
    with pytest.raises(ValueError, match=r"layer\(s\) \[7\]"):
        S3TModel(s3t_bert(4), _config(num_slices=2, layer_blocks=[[3, 7], [0]]))
    with pytest.raises(ValueError, match="5 slices need 5 layer blocks"):
        S3TModel(s3t_bert(4), _config(num_slices=5))
    with pytest.raises(ValueError, match="disjoint"):
        _config(num_slices=2, layer_blocks=[[3, 2], [2, 1]])
    with pytest.raises(ValueError, match="one block per slice"):
        _config(num_slices=2, layer_blocks=[[3, 2, 1, 0]])


def test_user_layers_to_transform_restricts_the_eligible_layers():
    lora = LoraConfig(r=2, target_modules=["query", "value"], layers_to_transform=[0, 1, 2, 3],
                      layers_pattern="layer")
    s3t = S3TModel(s3t_bert(12), _config(lora=lora, num_slices=2))
    assert s3t.blocks == [(3, 2), (1, 0)]


def test_head_and_target_errors():
    with pytest.raises(ValueError, match="head module 'score' not found"):
        S3TModel(s3t_bert(4), _config(num_slices=2, head_modules=("score",)))
    with pytest.raises(ValueError, match="matches no module"):
        S3TModel(s3t_bert(4), _config(num_slices=2, lora=LoraConfig(target_modules=["q_proj"])))
    with pytest.raises(ValueError, match="modules_to_save"):
        _config(lora=LoraConfig(target_modules=["query"], modules_to_save=["classifier"]))
