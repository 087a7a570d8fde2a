"""Make "LRA" a PEFT method.

`peft.utils.register_peft_method` only accepts names that are already members of `PeftType`, and PEFT has no public
way to add one, so the member is added here before registering. Everything else (config lookup, saving, loading,
`AutoPeftModel*`) then goes through PEFT's own registries.
"""

from __future__ import annotations

from peft.utils import PeftType

LRA_PEFT_TYPE_NAME = "LRA"


def ensure_peft_type(name: str = LRA_PEFT_TYPE_NAME) -> PeftType:
    """Return `PeftType[name]`, adding the member to the enum if this PEFT version lacks it."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    # type.__setattr__ bypasses EnumType.__setattr__, which refuses to (re)bind member names.
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


def register() -> None:
    """Register LRA with PEFT (idempotent, so re-importing the package is harmless)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from peft.utils import register_peft_method

    from .config import LRAConfig
    from .model import LRAModel

    peft_type = ensure_peft_type()
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=LRA_PEFT_TYPE_NAME.lower(), config_cls=LRAConfig, model_cls=LRAModel, prefix="lra_")
