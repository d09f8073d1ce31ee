"""The ``stowaway`` subcommands, one module each; ``stowaway.cli`` registers them.

Each module has a ``register(sub)`` that adds its parser(s) to the ``stowaway``
subparsers and points them at the function that runs the command. Argument types
are in :mod:`stowaway.commands.arguments`, output helpers in
:mod:`stowaway.commands.formatting`; the work itself is done by the layers below
(``stowaway.db``, the services), never here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from stowaway.settings import Settings

#: What a subcommand runs: the settings and the parsed flags in, the exit code out.
Command = Callable[[Settings, argparse.Namespace], int]
#: ``register(sub)``: adds one module's subcommand(s) to the ``stowaway`` subparsers.
Register = Callable[[Any], None]


def add_command(
    sub: Any, name: str, func: Command, help_text: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand parser that runs ``func``; its description defaults to ``help_text``."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=description or help_text
    )
    parser.set_defaults(func=func)
    return parser


def summary(doc: str | None) -> str | None:
    """A module docstring's first paragraph: a command's ``--help`` description."""
    return doc.split("\n\n")[0] if doc else None
