"""The AE dictionary: where each C-MOVE destination AE title listens.

Google's adapter format (``--aet_dictionary``, ``--aet_dictionary_inline`` or the
``ENV_AETS_JSON`` variable), read as leniently as it reads it::

    [{"name": "DEVICE_A", "host": "10.0.0.5", "port": 11113}]

Its sources in its order of precedence: the inline text, then the file, then the variable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from stowaway.lenient_json import LenientJSONError, loads

#: Google's environment variable for the dictionary's text.
ENV_AETS_JSON: Final = "ENV_AETS_JSON"


class AetDictionaryError(ValueError):
    """The dictionary cannot be read; the message names the source and the entry."""


@dataclass(frozen=True)
class MoveDestination:
    """One entry: a C-MOVE destination AE title and its address."""

    name: str
    host: str
    port: int


def parse(text: str, source: str) -> dict[str, MoveDestination]:
    """The entries of a dictionary's text, by AE title (a later duplicate wins, as in Google's)."""
    try:
        data = loads(text)
    except LenientJSONError as exc:
        raise AetDictionaryError(f"{source}: not JSON: {exc}") from None
    if not isinstance(data, list):
        raise AetDictionaryError(f"{source}: expected a JSON array of {{name, host, port}}")
    entries: dict[str, MoveDestination] = {}
    for index, item in enumerate(data):
        entry = _entry(item, f"{source}: entry {index + 1}")
        entries[entry.name] = entry
    return entries


def _entry(item: Any, where: str) -> MoveDestination:
    if not isinstance(item, dict):
        raise AetDictionaryError(f"{where}: expected an object with name, host and port")
    missing = [key for key in ("name", "host", "port") if key not in item]
    if missing:
        raise AetDictionaryError(f"{where}: missing {', '.join(missing)}")
    name, host, port = str(item["name"]).strip(), str(item["host"]).strip(), item["port"]
    if not 1 <= len(name) <= 16 or "\\" in name:
        raise AetDictionaryError(f"{where}: name must be an AE title of 1 to 16 characters")
    if not host:
        raise AetDictionaryError(f"{where} ({name}): host is empty")
    try:
        number = int(str(port))
    except ValueError:
        number = -1
    if not 1 <= number <= 65535:
        raise AetDictionaryError(f"{where} ({name}): port must be 1 to 65535, got {port!r}")
    return MoveDestination(name, host, number)


def load(
    inline: str | None, path: Path | None, environ: Mapping[str, str]
) -> dict[str, MoveDestination]:
    """The dictionary from the first source given: inline text, file, then ENV_AETS_JSON."""
    if inline:
        return parse(inline, "--aet_dictionary_inline")
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AetDictionaryError(
                f"--aet_dictionary: cannot read {path} ({exc.strerror or exc})"
            ) from None
        return parse(text, f"--aet_dictionary {path}")
    if environ.get(ENV_AETS_JSON):
        return parse(environ[ENV_AETS_JSON], ENV_AETS_JSON)
    return {}
