"""The forwarder's concurrency: grows while it pays, backs off when it does not or when
the destination says so, bounded by --max-workers (a simulated destination and clock)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from stowaway.forwarder.concurrency import MIN_WINDOW, Concurrency


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(
    concurrency: Concurrency,
    clock: Clock,
    rate: Callable[[int], float],
    latency: Callable[[int], float],
    windows: int,
) -> list[int]:
    """Feed ``windows`` windows of results from a destination delivering ``rate(limit)``
    bytes/s at ``latency(limit)`` s per request; returns the limit after each."""
    seen = []
    for _ in range(windows):
        n = concurrency.limit
        duration = max(MIN_WINDOW, latency(n)) * 1.01
        for _ in range(n):
            clock.now += duration / n
            concurrency.record(latency(n), int(rate(n) * duration / n))
        seen.append(concurrency.limit)
    return seen


def test_it_grows_to_the_maximum_while_throughput_rises() -> None:
    clock = Clock()
    c = Concurrency(4, 16, clock=clock)
    # A destination with a service time and room for many: throughput grows with the limit.
    seen = run(c, clock, rate=lambda n: n * 50_000.0, latency=lambda n: 0.2, windows=12)
    assert seen[-1] == 16 and max(seen) == 16


def test_it_stays_low_on_a_full_link() -> None:
    clock = Clock()
    c = Concurrency(2, 16, clock=clock)
    # A thin link: the rate is the same at any limit, each request just waits longer.
    seen = run(c, clock, rate=lambda n: 2.5e6, latency=lambda n: 0.5 * n, windows=30)
    assert max(seen) <= 3 and seen[-1] <= 3, seen


def test_rising_latency_without_gain_takes_one_away() -> None:
    clock = Clock()
    c = Concurrency(8, 8, clock=clock)
    c.adaptive = True  # at its maximum, it can only go down
    slow = {"factor": 1.0}
    run(c, clock, rate=lambda n: 1e6, latency=lambda n: 0.3 * slow["factor"], windows=2)
    slow["factor"] = 3.0  # the destination slows down; the rate does not grow
    seen = run(c, clock, rate=lambda n: 1e6, latency=lambda n: 0.3 * slow["factor"], windows=3)
    assert seen[-1] < 8, seen


def test_a_429_with_retry_after_halves_it_and_pauses_every_request() -> None:
    clock = Clock()
    c = Concurrency(8, 16, clock=clock)
    stop = threading.Event()
    c.record(0.1, 0, throttled=True, retry_after=5.0)
    assert c.limit == 4
    c.record(0.1, 0, throttled=True, retry_after=5.0)  # the same storm: halved once
    assert c.limit == 4
    assert 4.9 < c.paused_for <= 5.0
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(c.acquire(stop)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got  # no request starts during Retry-After
    clock.now += 5.1
    waiter.join(2)
    assert got == [True]
    # After the pause, one request alone tries again; the rest wait for its success.
    assert not _acquire_now(c)
    c.record(0.1, 1000)
    assert _acquire_now(c)
    c.release()
    c.release()


def _acquire_now(c: Concurrency) -> bool:
    stop = threading.Event()
    timer = threading.Timer(0.3, stop.set)
    timer.start()
    try:
        return c.acquire(stop)
    finally:
        timer.cancel()


def test_a_429_without_retry_after_pauses_longer_each_time() -> None:
    clock = Clock()
    c = Concurrency(4, 4, clock=clock)
    pauses = []
    for _ in range(4):
        c.record(0.1, 0, throttled=True)
        pauses.append(round(c.paused_for, 3))
        clock.now += 100
    assert pauses == [1.0, 2.0, 4.0, 8.0]
    assert c.limit == 4  # fixed: --max-workers equal to --workers


def test_acquire_gives_at_most_limit_slots_and_returns_false_on_stop() -> None:
    c = Concurrency(2, 2)
    stop = threading.Event()
    assert c.acquire(stop) and c.acquire(stop)
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(c.acquire(stop)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()
    stop.set()
    waiter.join(2)
    assert result == [False]


def test_an_idle_queue_changes_nothing() -> None:
    clock = Clock()
    c = Concurrency(4, 16, clock=clock)
    for _ in range(5):
        c.starved()
        clock.now += 1
        for _ in range(4):
            c.record(0.1, 1000)
    assert c.limit == 4
