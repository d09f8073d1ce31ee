"""SIGTERM/SIGINT handling, installed before anything slow is imported.

A long-running command (serve, receive, forward) turns the signal into the
``STOP`` event and shuts down cleanly, even when the signal arrives while it is
still starting; any other command simply exits.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

#: set once SIGTERM or SIGINT arrived
STOP = threading.Event()

_deferred = False


def install(*, deferred: bool) -> None:
    """Handle SIGTERM/SIGINT; ``deferred``: record the request instead of exiting."""
    global _deferred
    _deferred = deferred
    signal.signal(signal.SIGTERM, _handle)
    signal.signal(signal.SIGINT, _handle)


def _handle(signum: int, _frame: FrameType | None) -> None:
    STOP.set()
    if not _deferred:
        sys.exit(128 + signum)


def wait() -> None:
    """Block the main thread until a stop is requested.

    Polls: a signal the kernel hands to another thread only runs the Python
    handler once the main thread executes bytecode again, and a main thread
    parked in ``Event.wait()`` without a timeout never does.
    """
    while not STOP.wait(0.5):
        pass
