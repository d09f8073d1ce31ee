"""A Postgres queue that goes silent mid-run: the receiver answers a failure within seconds.

``receive`` reaches Postgres through a loopback relay that the test turns into
a black hole: every connection stays open, bytes go out, nothing comes back
(a half-open network). The C-STORE that arrives then must get a failure
status, not Success and not a wait on TCP retransmits.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.conftest import StowawayFactory
from tests.support.dicom_files import make_ct
from tests.support.scu import send
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.timeout(120), pytest.mark.postgres]

#: --db-statement-timeout 1s gives up on an answer after 3 s; a fresh
#: connection after 2 s (--db-connect-timeout). The receiver's failure path
#: makes one more queue call (does its row exist?), so two of those and slack.
BOUND = 15.0


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_a_c_store_gets_a_failure_status_within_seconds_when_the_database_goes_silent(
    stowaway: StowawayFactory, db_url: str, tmp_path: Path
) -> None:
    url = make_url(db_url)
    with TcpProxy(url.port or 5432, url.host or "127.0.0.1") as proxy:
        proxied = url.set(port=proxy.port).render_as_string(hide_password=False)
        proc = stowaway(
            "receive",
            "--db-url",
            proxied,
            "--db-statement-timeout",
            "1s",
            "--db-connect-timeout",
            "2s",
        )
        assert send(proc.port, make_ct(tmp_path / "a.dcm", seed=1)) == "stored"
        proxy.black_hole()
        started = time.monotonic()
        outcome = send(proc.port, make_ct(tmp_path / "b.dcm", seed=2))
        took = time.monotonic() - started
    assert outcome == "status 0xa700", proc.log()[-2000:]
    assert took < BOUND, f"answered after {took:.1f} s"
