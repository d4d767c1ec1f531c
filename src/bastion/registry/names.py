"""Names of tenants and models: lower-case, URL- and Redis-key-safe, never holding '|' or ':'."""

from __future__ import annotations

import re

from bastion.errors import InvalidInput

NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def check_name(kind: str, name: str) -> str:
    if not NAME.fullmatch(name):
        raise InvalidInput(f"{kind} name {name!r} must match {NAME.pattern}")
    return name
