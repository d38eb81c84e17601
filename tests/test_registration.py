"""import peft_mape registers a real PeftType member and the tuner."""

from __future__ import annotations

import importlib
import json

from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType

import peft_mape
from peft_mape import MAPEConfig, MAPEModel
from peft_mape.tuner.registration import ensure_peft_type, register_mape


def test_peft_type_is_a_real_enum_member():
    member = PeftType.MAPE
    assert isinstance(member, PeftType)
    assert member.name == member.value == "MAPE"
    assert PeftType("MAPE") is member and PeftType["MAPE"] is member
    assert list(PeftType).count(member) == 1


def test_registration_is_idempotent():
    before = len(list(PeftType))
    assert ensure_peft_type() is PeftType.MAPE
    register_mape(MAPEConfig, MAPEModel)
    importlib.reload(peft_mape)
    assert len(list(PeftType)) == before
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.MAPE].__name__ == "MAPEModel"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.MAPE].__name__ == "MAPEConfig"
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.MAPE] == "mape_"


def test_config_round_trips_through_json(tmp_path):
    config = MAPEConfig(sparsity=0.8, units="filters", selection={"heads": {}, "filters": {"0": [1, 2]}})
    assert config.peft_type is PeftType.MAPE  # the member: transformers calls .value on it
    config.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "MAPE"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, MAPEConfig) and loaded.peft_type is PeftType.MAPE
    assert loaded.sparsity == 0.8 and loaded.selection == {"heads": {}, "filters": {"0": [1, 2]}}
