"""GUIDs as VMBus spells them.

sysfs prints instance GUIDs in lower case without braces as directory names
(``dev_set_name("%pUl")``) and with braces in ``class_id`` / ``device_id``; users type
them in any case, with or without braces. :func:`parse_guid` accepts all of these and
says exactly what is wrong with anything else.
"""

from __future__ import annotations

import re
import uuid

from .errors import InvalidGuid

__all__ = ["Guid", "is_guid", "parse_guid"]

_HEX = re.compile(r"[0-9a-fA-F]+")
_GROUPS = (8, 4, 4, 4, 12)


class Guid(str):
    """A canonical GUID string: lower case, dashed, no braces (the sysfs directory name)."""

    __slots__ = ()

    @property
    def braced(self) -> str:
        """The form sysfs uses in ``class_id`` and ``device_id``: ``{...}``."""
        return "{" + self + "}"

    @property
    def bytes_le(self) -> bytes:
        """The 16 bytes in memory order (little-endian first three fields), as on the wire."""
        return uuid.UUID(str(self)).bytes_le

    @classmethod
    def from_bytes_le(cls, raw: bytes) -> Guid:
        """A GUID from its 16 wire bytes (the order ``modalias`` and ring messages use)."""
        return cls(str(uuid.UUID(bytes_le=bytes(raw))))


def parse_guid(text: str) -> Guid:
    """Return the canonical form of ``text``, or raise :class:`InvalidGuid` saying why."""
    if not isinstance(text, str):
        raise InvalidGuid(repr(text), "expected a string")
    s = text.strip()
    if s.startswith("{") or s.endswith("}"):
        if not (s.startswith("{") and s.endswith("}")):
            raise InvalidGuid(text, "unbalanced braces")
        s = s[1:-1]
    parts = s.split("-")
    if len(parts) != 5:
        raise InvalidGuid(
            text, f"expected 5 dash-separated groups of 8-4-4-4-12 hex digits, got {len(parts)}"
        )
    for i, (part, want) in enumerate(zip(parts, _GROUPS, strict=True)):
        if len(part) != want:
            raise InvalidGuid(text, f"group {i + 1} has {len(part)} digits, expected {want}")
        if not _HEX.fullmatch(part):
            bad = next(c for c in part if c not in "0123456789abcdefABCDEF")
            raise InvalidGuid(text, f"group {i + 1} has a non-hex character {bad!r}")
    return Guid(s.lower())


def is_guid(text: str) -> bool:
    """True when :func:`parse_guid` would accept ``text``."""
    try:
        parse_guid(text)
    except InvalidGuid:
        return False
    return True
