"""GUID parsing in every spelling and the class table of SPEC section 7."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmbus.classes import CLASSES, UNKNOWN, class_by_guid, class_by_name, lookup_class
from pyvmbus.errors import InvalidGuid
from pyvmbus.guid import Guid, is_guid, parse_guid

G = "ed963694-e847-4b2a-85af-bc9cfc11d6f3"


@pytest.mark.parametrize("text", [G, G.upper(), "{" + G + "}", "{" + G.upper() + "}", f"  {G}\n"])
def test_parse_every_spelling(text: str) -> None:
    g = parse_guid(text)
    assert g == G
    assert isinstance(g, Guid)
    assert g.braced == "{" + G + "}"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("ed963694-e847-4b2a-85af", "expected 5"),
        ("ed963694-e847-4b2a-85af-bc9cfc11d6f", "group 5 has 11 digits"),
        ("ed96369x-e847-4b2a-85af-bc9cfc11d6f3", "non-hex character 'x'"),
        ("{ed963694-e847-4b2a-85af-bc9cfc11d6f3", "unbalanced braces"),
        ("", "expected 5"),
    ],
)
def test_bad_guids_say_why(text: str, reason: str) -> None:
    with pytest.raises(InvalidGuid, match=reason) as info:
        parse_guid(text)
    assert info.value.text == text
    assert not is_guid(text)


@given(st.uuids())
def test_roundtrip_bytes_le(u: uuid.UUID) -> None:
    g = parse_guid(str(u).upper())
    assert Guid.from_bytes_le(g.bytes_le) == g
    assert g.bytes_le == u.bytes_le


def test_table_matches_spec() -> None:
    assert len(CLASSES) == 16
    assert [c.dev_type for c in CLASSES] == list(range(16))
    names = {c.name for c in CLASSES}
    assert names == {
        "network", "scsi", "ide", "fc", "nd", "pci", "video", "keyboard", "mouse", "kvp",
        "timesync", "heartbeat", "shutdown", "fcopy", "vss", "balloon",
    }
    assert class_by_name("network").guid == "f8615163-df3e-46c5-913f-f2d2f965ed0e"
    assert class_by_name("fcopy").pref_ring_size == 0x4000
    assert class_by_name("heartbeat").ring_size == 2 * 1024 * 1024
    assert UNKNOWN.pref_ring_size == 0x11000
    assert class_by_name("scsi").storage and class_by_name("network").network
    assert all(c.perf_device == (c.dev_type <= 5) for c in CLASSES)


def test_lookup_by_guid_and_name() -> None:
    assert class_by_guid("{57164F39-9115-4E78-AB55-382F3BD5422D}").name == "heartbeat"
    assert class_by_guid("00000000-0000-0000-0000-000000000001") is UNKNOWN
    assert lookup_class("Heartbeat").name == "heartbeat"
    assert lookup_class("57164f39-9115-4e78-ab55-382f3bd5422d").name == "heartbeat"
    odd = lookup_class("00000000-0000-0000-0000-000000000001")
    assert odd.name == "unknown" and odd.guid == "00000000-0000-0000-0000-000000000001"
    with pytest.raises(KeyError, match="known: balloon"):
        class_by_name("floppy")
    with pytest.raises(KeyError, match="neither a class GUID"):
        lookup_class("floppy")
