"""One-line error text: what log fields, ErrorComments and operator messages carry."""

from __future__ import annotations

from stowaway.text import describe_error, first_line


def test_first_line_is_the_first_non_empty_line_cut_to_the_limit() -> None:
    assert first_line(ValueError("\n  disk full  \nmore detail")) == "disk full"
    assert first_line("x" * 500, limit=10) == "x" * 10


def test_an_exception_without_a_message_is_named_by_its_type() -> None:
    assert first_line(TimeoutError()) == "TimeoutError"
    assert first_line(OSError("")) == "OSError"
    assert first_line("") == ""


def test_describe_error_names_the_type_once() -> None:
    assert describe_error(ConnectionError("refused\nsecond")) == "ConnectionError: refused"
    assert describe_error(KeyError()) == "KeyError"
