"""How many uploads a forwarder runs at once: it finds the number itself.

A link with a long round trip, or a destination that takes 100-300 ms per
request (the Healthcare API), needs many requests in flight; a thin uplink is
full with one or two big ones, and more only queue behind each other. So the
forwarder starts at ``--workers`` and measures, window by window, the bytes
per second its uploads deliver:

* while raising the limit pays (the rate grows by ``GAIN`` or more), it goes on
  raising it, by half of it at first (``slow start``), later by one;
* when a raise brought nothing, it goes back down and holds for
  ``HOLD_WINDOWS`` windows before it tries one more again;
* when the requests' latency rises (``LATENCY_RISE`` times the level's
  first window) without the rate rising, it steps down by one;
* a 429, or a 503 (or any answer) with Retry-After, halves the limit; no new
  request starts until Retry-After has passed (a 429 without one: 1 s,
  doubling up to ``MAX_PAUSE``), and then one request alone tries again, the
  others waiting for its success: a rate-limited destination sees about one
  request per Retry-After, whatever the backlog;

never above ``--max-workers``, never below one. With ``--max-workers`` equal
to ``--workers`` the limit is fixed (the pause on Retry-After still applies).
A window closes once every allowed upload has finished about once and at
least ``MIN_WINDOW`` seconds have passed; a window in which a worker found the
queue empty says nothing about the destination and changes nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("stowaway.forwarder")

#: A raise counts as paying when the rate grows at least this much.
GAIN = 1.10
#: Latency this many times the level's first window, with no gain: one less.
LATENCY_RISE = 2.0
#: Windows to stay at a level after a raise that brought nothing.
HOLD_WINDOWS = 8
#: The shortest window, seconds.
MIN_WINDOW = 0.5
#: The longest pause after a 429 without Retry-After, seconds.
MAX_PAUSE = 30.0
#: How often a waiting worker looks at its stop event, seconds.
WAKE = 0.1


@dataclass
class _Window:
    started: float
    requests: int = 0
    size_bytes: int = 0
    seconds: float = 0.0
    starved: bool = False

    def rate(self, now: float) -> float:
        return self.size_bytes / max(now - self.started, 1e-6)

    @property
    def latency(self) -> float:
        return self.seconds / self.requests if self.requests else math.inf


@dataclass(frozen=True)
class _Level:
    """What a window measured: for comparing the next one with."""

    rate: float
    latency: float


class Concurrency:
    """The forwarder's upload slots: ``acquire`` before a claim, ``release`` after its
    upload, ``record`` each request's result (thread-safe)."""

    def __init__(
        self,
        initial: int,
        maximum: int,
        *,
        name: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maximum = max(1, maximum)
        self.limit = max(1, min(initial, self.maximum))
        self.adaptive = self.maximum > self.limit
        self.name = name
        self._clock = clock
        self._cond = threading.Condition()
        self._active = 0
        self._paused_until = 0.0
        #: after a throttle: one request at a time until one succeeds
        self._trying_again = False
        self._throttled_in_a_row = 0
        self._window = _Window(clock())
        self._previous: _Level | None = None
        self._level_latency: float | None = None  # the first window's at this limit
        self._raised_by = 0  # the last raise, while it is on trial
        self._hold = 0
        self._slow_start = True

    # -- slots ---------------------------------------------------------------

    def acquire(self, stop: threading.Event) -> bool:
        """Wait for a slot (below the limit, not paused); False once ``stop`` is set."""
        with self._cond:
            while not stop.is_set():
                wait = self._paused_until - self._clock()
                allowed = 1 if self._trying_again else self.limit
                if wait <= 0 and self._active < allowed:
                    self._active += 1
                    return True
                self._cond.wait(min(WAKE, wait) if wait > 0 else WAKE)
        return False

    def release(self) -> None:
        with self._cond:
            self._active -= 1
            self._cond.notify_all()

    @property
    def paused_for(self) -> float:
        """Seconds until new requests may start (0: not paused)."""
        with self._cond:
            return max(0.0, self._paused_until - self._clock())

    # -- what the requests say ---------------------------------------------------

    def starved(self) -> None:
        """A worker found nothing to send: this window measures the queue, not the link."""
        with self._cond:
            self._window.starved = True

    def record(
        self,
        seconds: float,
        delivered_bytes: int,
        *,
        throttled: bool = False,
        retry_after: float | None = None,
    ) -> None:
        """One request's result: how long it took, how many bytes it delivered, and
        whether the destination asked us to slow down (429, or Retry-After)."""
        with self._cond:
            now = self._clock()
            if throttled or retry_after is not None:
                self._throttle(now, retry_after)
                return
            if delivered_bytes:
                self._throttled_in_a_row = 0
                if self._trying_again:
                    self._trying_again = False
                    self._cond.notify_all()
            window = self._window
            window.requests += 1
            window.size_bytes += delivered_bytes
            window.seconds += seconds
            if window.requests >= self.limit and now - window.started >= MIN_WINDOW:
                self._decide(now)

    def _throttle(self, now: float, retry_after: float | None) -> None:
        self._throttled_in_a_row += 1
        pause = (
            retry_after
            if retry_after is not None
            else min(MAX_PAUSE, 2.0 ** (self._throttled_in_a_row - 1))
        )
        first = self._paused_until <= now
        self._trying_again = True
        self._paused_until = max(self._paused_until, now + min(pause, MAX_PAUSE * 20))
        if self.adaptive and first:
            self._set(max(1, self.limit // 2), "throttled")
            self._slow_start = False
            self._hold = HOLD_WINDOWS
        self._restart(now)

    def _decide(self, now: float) -> None:
        window = self._window
        level = _Level(window.rate(now), window.latency)
        previous = self._previous
        self._restart(now)
        if not self.adaptive or window.starved:
            self._raised_by = 0
            return
        if self._raised_by:
            if previous is not None and level.rate < previous.rate * GAIN:
                self._set(max(1, self.limit - self._raised_by), "no gain")
                self._slow_start = False
                self._hold = HOLD_WINDOWS
                self._raised_by = 0
                return
            self._raised_by = 0
            self._level_latency = level.latency
        if self._level_latency is None:
            self._level_latency = level.latency
        elif (
            level.latency > self._level_latency * LATENCY_RISE
            and previous is not None
            and level.rate < previous.rate * GAIN
            and self.limit > 1
        ):
            self._set(self.limit - 1, "latency rising")
            self._hold = HOLD_WINDOWS
            return
        self._previous = level
        if self._hold > 0:
            self._hold -= 1
            return
        if self.limit < self.maximum:
            step = max(1, self.limit // 2) if self._slow_start else 1
            raised = min(self.maximum, self.limit + step)
            self._raised_by = raised - self.limit
            self._set(raised, "raise")

    def _set(self, limit: int, why: str) -> None:
        if limit == self.limit:
            return
        log.info(
            "forwarder_concurrency",
            extra={"destination": self.name, "from": self.limit, "to": limit, "why": why},
        )
        self.limit = limit
        self._level_latency = None if why != "raise" else self._level_latency
        self._cond.notify_all()

    def _restart(self, now: float) -> None:
        self._window = _Window(now)
