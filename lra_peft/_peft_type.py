"""The `PeftType.LRA` member (a leaf module: config.py needs it, and `__init__` registers the method with it).

`peft.utils.register_peft_method` only accepts names that are already members of `PeftType`, and PEFT has no public
way to add one, so the member is added here; `lra_peft/__init__.py` then registers LRA through PEFT's own registry.
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
