"""Shorter idle sleeps in pynetdicom's DUL reactor while a sender is streaming instances.

pynetdicom's DUL thread polls: when a loop finds nothing to do it sleeps
``_run_loop_delay`` (1 ms) before looking again. After a C-STORE handler
returns, the response waits for that thread to wake up and send it, and the
sender's next request waits for it again: up to 2 ms per instance, as much as
the work for a small instance. Polling faster all the time would cost CPU on
every idle association, so :func:`hurry` shortens the delay only for a short
while after each response; a sender that keeps sending keeps it short, and an
association that goes quiet is back to pynetdicom's default within
``HOLD`` seconds.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Final

#: the DUL's idle sleep right after a response (pynetdicom's default is 1 ms)
FAST_DELAY: Final = 0.0001
#: how long after a response the fast polling lasts
HOLD: Final = 0.1

_lock = threading.Lock()
_hurried: dict[Any, tuple[float, float]] = {}  # DUL -> (its own delay, fast until)
_watcher: threading.Thread | None = None


def hurry(assoc: Any) -> None:
    """Poll ``assoc``'s connection every FAST_DELAY for the next HOLD seconds."""
    global _watcher
    dul = getattr(assoc, "dul", None)
    if dul is None or not isinstance(getattr(dul, "_run_loop_delay", None), float):
        return  # not the pynetdicom this was written for: leave it alone
    with _lock:
        default = _hurried[dul][0] if dul in _hurried else dul._run_loop_delay
        _hurried[dul] = (default, time.monotonic() + HOLD)
        dul._run_loop_delay = min(default, FAST_DELAY)
        if _watcher is None:
            _watcher = threading.Thread(target=_restore_when_quiet, name="dul-pacing", daemon=True)
            _watcher.start()


def _restore_when_quiet() -> None:
    global _watcher
    while True:
        time.sleep(HOLD / 2)
        now = time.monotonic()
        with _lock:
            for dul, (default, until) in list(_hurried.items()):
                if until <= now:
                    dul._run_loop_delay = default
                    del _hurried[dul]
            if not _hurried:
                _watcher = None
                return
