"""JSON as Google's adapter reads its configuration (org.json): leniently.

Its AE dictionary and destination files are read with org.json, which also accepts
single-quoted strings, unquoted keys and words, trailing commas, ``;`` between items and
``=``/``=>`` between a key and its value. Files written for it must load here unchanged,
so this reader accepts the same. A leaf module: it imports nothing from the project.
"""

from __future__ import annotations

import re
from typing import Any, Final

_NUMBER: Final = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?$")
#: Characters that end an unquoted word (org.json's list).
_WORD_END: Final = set(',:]}/\\"[{;=#') | set(" \t\r\n")
_ESCAPES: Final = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r"}


class LenientJSONError(ValueError):
    """Not even lenient JSON; the message gives the position."""


def loads(text: str) -> Any:
    """Parse ``text``; raises :class:`LenientJSONError` with the character position."""
    parser = _Parser(text)
    value = parser.value()
    parser.skip_space()
    if parser.pos < len(text):
        parser.fail("unexpected text after the value")
    return value


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, what: str) -> None:
        line = self.text.count("\n", 0, self.pos) + 1
        raise LenientJSONError(f"{what} at line {line}, character {self.pos + 1}")

    def skip_space(self) -> None:
        while self.pos < len(self.text):
            if self.text[self.pos].isspace():
                self.pos += 1
            elif self.text.startswith("//", self.pos) or self.text.startswith("#", self.pos):
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif self.text.startswith("/*", self.pos):
                end = self.text.find("*/", self.pos + 2)
                if end < 0:
                    self.fail("unclosed comment")
                self.pos = end + 2
            else:
                return

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def value(self) -> Any:
        char = self.peek()
        if char == "{":
            return self.object()
        if char == "[":
            return self.array()
        if char in ("'", '"'):
            return self.string(char)
        if not char:
            self.fail("a value expected")
        return self.word()

    def object(self) -> dict[str, Any]:
        self.pos += 1
        result: dict[str, Any] = {}
        while True:
            char = self.peek()
            if char == "}":
                self.pos += 1
                return result
            key = self.value()
            if isinstance(key, (dict, list)):
                self.fail("an object key must be a string")
            char = self.peek()
            if char == "=":
                self.pos += 2 if self.text.startswith("=>", self.pos) else 1
            elif char == ":":
                self.pos += 1
            else:
                self.fail("':' expected after a key")
            result[str(key)] = self.value()
            char = self.peek()
            if char in (",", ";"):
                self.pos += 1
            elif char != "}":
                self.fail("',' or '}' expected")

    def array(self) -> list[Any]:
        self.pos += 1
        result: list[Any] = []
        while True:
            char = self.peek()
            if char == "]":
                self.pos += 1
                return result
            result.append(self.value())
            char = self.peek()
            if char in (",", ";"):
                self.pos += 1
            elif char != "]":
                self.fail("',' or ']' expected")

    def string(self, quote: str) -> str:
        self.pos += 1
        out: list[str] = []
        while True:
            if self.pos >= len(self.text):
                self.fail("unterminated string")
            char = self.text[self.pos]
            self.pos += 1
            if char == quote:
                return "".join(out)
            if char in "\r\n":
                self.fail("line break inside a string")
            if char != "\\":
                out.append(char)
                continue
            escape = self.text[self.pos : self.pos + 1]
            self.pos += 1
            if escape == "u":
                digits = self.text[self.pos : self.pos + 4]
                if not re.fullmatch(r"[0-9a-fA-F]{4}", digits):
                    self.fail("bad \\u escape")
                out.append(chr(int(digits, 16)))
                self.pos += 4
            else:
                out.append(_ESCAPES.get(escape, escape))

    def word(self) -> Any:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _WORD_END:
            self.pos += 1
        word = self.text[start : self.pos].strip()
        if not word:
            self.fail(f"unexpected {self.text[start : start + 1]!r}")
        lowered = word.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered == "null":
            return None
        if _NUMBER.match(word):
            number = float(word)
            return int(number) if number.is_integer() and re.fullmatch(r"-?\d+", word) else number
        return word
