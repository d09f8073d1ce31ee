"""--admin-token-file: its format, its errors (never showing a token), rotation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stowaway.api.tokens import AdminTokens, TokenFileError, parse_tokens
from stowaway.cli import build_parser
from stowaway.settings import SettingsError, load_settings

GOOD = "alice:0123456789abcdef\n# a comment\n\nbob:fedcba9876543210-x\n"


def test_a_token_is_known_by_its_name_and_only_exactly(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(GOOD)
    tokens = AdminTokens(path)
    assert tokens.who("0123456789abcdef") == "alice"
    assert tokens.who("fedcba9876543210-x") == "bob"
    for wrong in ("0123456789abcde", "0123456789abcdef ", "", "alice", "0123456789ABCDEF"):
        assert tokens.who(wrong) is None, wrong


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no name:token line"),
        ("# only a comment\n", "holds no name:token line"),
        ("justatokenwithoutname0000\n", "line 1: expected name:token"),
        ("al ice:0123456789abcdef\n", "line 1: expected name:token"),
        ("alice:short\n", "line 1 (alice): the token must be at least 16"),
        ("alice:0123456789 abcdef\n", "line 1 (alice): the token must be at least 16"),
        ("a:0123456789abcdef\na:0123456789abcdeg\n", "line 2: the name a is given twice"),
        ("a:0123456789abcdef\nb:0123456789abcdef\n", "line 2 (b): this token is given twice"),
    ],
)
def test_a_malformed_file_is_one_line_naming_the_line_never_the_token(
    text: str, message: str
) -> None:
    with pytest.raises(TokenFileError) as caught:
        parse_tokens(text)
    assert message in str(caught.value)
    assert "0123456789" not in str(caught.value)


def test_the_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(GOOD)
    tokens = AdminTokens(path)
    assert tokens.who("0123456789abcdef") == "alice"
    path.write_text("carol:carol-token-0000000000\n")
    os.utime(path, ns=(1, 1))  # a different stamp even within the clock's resolution
    assert tokens.who("0123456789abcdef") is None
    assert tokens.who("carol-token-0000000000") == "carol"
    path.write_text("broken\n")
    os.utime(path, ns=(2, 2))
    with pytest.raises(TokenFileError, match="line 1"):
        tokens.who("carol-token-0000000000")


def test_the_flag_is_checked_at_start_up(tmp_path: Path) -> None:
    parser = build_parser()
    missing = parser.parse_args(["serve", "--admin-token-file", str(tmp_path / "nope")])
    with pytest.raises(SettingsError, match=r"^--admin-token-file: cannot read .*nope"):
        load_settings(missing, environ={})
    path = tmp_path / "tokens"
    path.write_text("x:tooshort\n")
    bad = parser.parse_args(["serve"])
    with pytest.raises(SettingsError, match=r"--admin-token-file: line 1 \(x\)"):
        load_settings(bad, environ={"STOWAWAY_ADMIN_TOKEN_FILE": str(path)})
    path.write_text(GOOD)
    assert (
        load_settings(bad, environ={"STOWAWAY_ADMIN_TOKEN_FILE": str(path)}).admin_token_file
        == path
    )


def test_the_variable_naming_no_file_is_read_only_but_the_flag_is_an_error(
    tmp_path: Path,
) -> None:
    """A manifest's optional Secret may be absent (no crash loop); an operator's own
    --admin-token-file naming no file is a mistake to stop at."""
    parser = build_parser()
    missing = tmp_path / "admin" / "tokens"
    environ = {"STOWAWAY_ADMIN_TOKEN_FILE": str(missing)}
    settings = load_settings(parser.parse_args(["serve"]), environ=environ)
    assert settings.admin_token_file is None
    assert settings.admin_token_file_absent == missing
    flagged = parser.parse_args(["serve", "--admin-token-file", str(missing)])
    with pytest.raises(SettingsError, match=r"^--admin-token-file: cannot read .*tokens"):
        load_settings(flagged, environ=environ)
    # Present but unreadable or malformed is an error whichever way it was named.
    missing.parent.mkdir()
    missing.write_text("x:tooshort\n")
    with pytest.raises(SettingsError, match=r"--admin-token-file: line 1 \(x\)"):
        load_settings(parser.parse_args(["serve"]), environ=environ)
    missing.write_text(GOOD)
    settings = load_settings(parser.parse_args(["serve"]), environ=environ)
    assert (settings.admin_token_file, settings.admin_token_file_absent) == (missing, None)
