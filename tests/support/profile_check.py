"""Check a stored, de-identified copy against its profile's table, element by element."""

from __future__ import annotations

from pydicom.dataset import Dataset

from stowaway.forwarder.deidentify import Action, Redactor, UidMapper

__all__ = ["check_against_profile"]


def check_against_profile(
    redactor: Redactor, original: Dataset, stored: Dataset, mapper: UidMapper, where: str
) -> int:
    """Every element of ``original`` has in ``stored`` what the profile says; returns how
    many elements were checked (nested ones included)."""
    checked = 0
    for elem in original:
        tag = int(elem.tag)
        name = f"{where}{elem.keyword or elem.tag}"
        action = Action.REMOVE if tag == 0xFFFCFFFC else redactor.spec.action(tag)
        checked += 1
        if action is Action.REMOVE:
            assert tag not in stored, name
            continue
        assert tag in stored, name
        kept = stored[tag]
        if action is Action.EMPTY:
            assert kept.value in (None, "", b"") or (kept.VR == "SQ" and not kept.value), name
        elif action is Action.MAP_UID:
            assert kept.value == mapper.map(str(elem.value)), name
        elif action is Action.DUMMY and elem.VR != "SQ":
            assert kept.value != elem.value, name
        elif elem.VR == "SQ":
            assert len(kept.value) == len(elem.value), name
            for i, (before, after) in enumerate(zip(elem.value, kept.value, strict=True)):
                checked += check_against_profile(redactor, before, after, mapper, f"{name}[{i}].")
        elif tag != 0x7FE00010:
            assert kept.value == elem.value, name
    return checked
