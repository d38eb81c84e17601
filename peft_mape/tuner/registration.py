"""Register the MAPE tuner type with PEFT.

``peft.register_peft_method`` only accepts names that are already members of ``PeftType``,
and ``PeftType`` is a closed ``str`` enum. We therefore add a real member ``MAPE`` (name ==
value == "MAPE") to the enum at import time. It must be a real member, not a string:
transformers' ``load_adapter`` calls ``peft_config.peft_type.value``. Both steps are idempotent
so that re-importing (or importing from several entry points) is harmless.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType, register_peft_method

MAPE_NAME = "MAPE"
MAPE_PREFIX = "mape_"


def ensure_peft_type() -> PeftType:
    """Return ``PeftType.MAPE``, adding it to the enum first if needed."""
    existing = PeftType._member_map_.get(MAPE_NAME)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, MAPE_NAME)
    member._name_ = MAPE_NAME
    member._value_ = MAPE_NAME
    member.__objclass__ = PeftType
    member.__init__(MAPE_NAME)
    # Class attribute first: EnumType refuses to set attributes named like existing members.
    type.__setattr__(PeftType, MAPE_NAME, member)
    PeftType._member_map_[MAPE_NAME] = member
    PeftType._value2member_map_[MAPE_NAME] = member
    PeftType._member_names_.append(MAPE_NAME)
    return member


def register_mape(config_cls, model_cls) -> None:
    """Register ``MAPEConfig``/``MAPEModel`` under ``PeftType.MAPE`` with prefix ``mape_``."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    peft_type = ensure_peft_type()
    if PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return
    register_peft_method(
        name=MAPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls, prefix=MAPE_PREFIX
    )
