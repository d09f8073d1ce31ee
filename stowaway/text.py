"""Short, safe text for log lines, DICOM ErrorComments and operator messages.

A leaf module: it imports nothing from the project, so every layer (``db``, ``receiver``,
``forwarder`` and the commands) may use it without crossing a boundary
(``tests/unit/test_layering.py`` checks both).
"""

from __future__ import annotations

DEFAULT_LIMIT = 200


def first_line(error: BaseException | str, limit: int = DEFAULT_LIMIT) -> str:
    """The first non-empty line of an exception's message (or of a text), at most ``limit``
    characters; an exception without a message is named by its type."""
    text = str(error)
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    if not line and isinstance(error, BaseException):
        line = type(error).__name__
    return line[:limit]


def describe_error(error: BaseException, limit: int = DEFAULT_LIMIT) -> str:
    """``TypeName: first line`` for a log field or a stored last error."""
    message = first_line(error, limit)
    name = type(error).__name__
    return name if message == name else f"{name}: {message}"
