"""When to try again: exponential backoff with jitter (uploads and commitment reports).

A leaf module: it imports nothing of stowaway, so the receiver and the forwarder
both use it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

#: The exponent of the backoff stops growing here: ``2.0 ** 1024`` overflows a
#: float (attempt 1025, about five days of 5xx with unlimited attempts), and
#: long before that the delay is ``maximum`` anyway (2**64 seconds is longer
#: than any configured maximum).
MAX_DOUBLINGS = 64


@dataclass(frozen=True)
class RetryPolicy:
    """Answers "when next, or never" for an instance that failed transiently.

    The n-th retry waits ``initial * 2**(n-1)`` seconds, capped at ``maximum``,
    with "equal jitter" (a random point in the upper half of that delay) so that
    a destination coming back is not hit by every forwarder at the same moment.
    A Retry-After from the destination is honoured when it asks for longer.
    """

    initial: float = 2.0
    maximum: float = 600.0
    max_attempts: int | None = None

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
        doublings = min(max(0, attempts - 1), MAX_DOUBLINGS)
        base = min(self.maximum, self.initial * 2.0**doublings)
        jittered: float = base / 2 + random.uniform(0, base / 2)
        if retry_after is not None:
            return max(jittered, min(float(retry_after), self.maximum))
        return jittered

    def next_attempt(
        self, now: datetime, attempts: int, retry_after: float | None = None
    ) -> datetime | None:
        """When to try again after ``attempts`` failures, or ``None`` to give up."""
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return None
        return now + timedelta(seconds=self.delay(attempts, retry_after))
