"""serve's forwarder gives way to an ongoing transfer (senders first), within a bound."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from stowaway.forwarder.worker import Forwarder, ForwarderConfig
from stowaway.service import ReceiveActivity


def forwarder(receiving_for: float | None, sender_first: float = 10.0) -> Forwarder:
    config = ForwarderConfig("http://127.0.0.1:1", sender_first=timedelta(seconds=sender_first))
    unused: Any = None
    return Forwarder(config, unused, unused, unused, receiving_for=lambda: receiving_for)


def test_every_worker_uploads_between_transfers() -> None:
    f = forwarder(receiving_for=None)
    assert not any(f._gives_way(i) for i in range(4))


def test_every_worker_waits_early_in_a_transfer() -> None:
    f = forwarder(receiving_for=2.0)
    assert all(f._gives_way(i) for i in range(4))


def test_one_worker_goes_on_in_a_long_transfer() -> None:
    f = forwarder(receiving_for=11.0)
    assert [f._gives_way(i) for i in range(4)] == [False, True, True, True]


def test_zero_turns_it_off() -> None:
    f = forwarder(receiving_for=2.0, sender_first=0)
    assert not any(f._gives_way(i) for i in range(4))


def test_a_transfer_is_a_run_of_stores_without_a_long_gap() -> None:
    activity = ReceiveActivity(window=0.2)
    assert activity.receiving_for() is None
    activity.stored()
    time.sleep(0.1)
    activity.stored()
    took = activity.receiving_for()
    assert took is not None and took >= 0.1  # measured from the first store of the run
    time.sleep(0.25)
    assert activity.receiving_for() is None  # the gap ended it
    activity.stored()
    again = activity.receiving_for()
    assert again is not None and again < 0.1  # a new transfer starts from zero
