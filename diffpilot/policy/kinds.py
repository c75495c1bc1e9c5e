"""Where policy classes register their kind (the bottom of the policy layer; imports nothing of it).

:mod:`diffpilot.policy.registry` imports every policy module and answers
"which class is kind X"; this module only holds the table they fill.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

__all__ = ["POLICIES", "register_policy"]

POLICIES: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_policy(kind: str):  # type: ignore[no-untyped-def]
    """Class decorator: register a policy class under ``kind`` (also sets ``cls.KIND``)."""

    def wrap(cls: T) -> T:
        if kind in POLICIES and POLICIES[kind] is not cls:
            raise ValueError(f"policy kind {kind!r} is registered twice ({POLICIES[kind].__name__} and {cls.__name__})")
        if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
            raise TypeError(f"policy {cls.__name__} needs a Config dataclass to be registered")
        cls.KIND = kind
        POLICIES[kind] = cls
        return cls

    return wrap
