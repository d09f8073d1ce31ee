"""`stowaway forward` against a local stub of the Cloud Healthcare API.

Each scenario asserts the rows' states and attempts, and that nothing is lost
once the stub recovers. These are destination behaviours, so they run on
SQLite; the multi-forwarder test runs on Postgres.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from stowaway.db.engine import make_engine
from stowaway.db.models import DEFAULT_DESTINATION, DestinationState, Status
from stowaway.db.queue import Queue, QueuedInstance
from tests.conftest import StowawayFactory
from tests.support.databases import postgres_database, sqlite_url
from tests.support.dicom_files import make_ct, make_study, read_uids
from tests.support.healthcare_stub import Fault, HealthcareStub
from tests.support.metadata_server import MetadataServer
from tests.support.processes import dcmsend
from tests.support.seeding import seed_queue, wait_until

pytestmark = pytest.mark.timeout(180)

FAST = (
    "--poll-interval",
    "50ms",
    "--backoff-initial",
    "200ms",
    "--backoff-max",
    "1s",
    "--auth",
    "none",
)


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    from stowaway.db.migrate import upgrade_to_head

    url = sqlite_url(tmp_path)
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    yield url


@pytest.fixture
def stub() -> Iterator[HealthcareStub]:
    with HealthcareStub() as s:
        yield s


def rows(db_url: str) -> list[QueuedInstance]:
    engine = make_engine(db_url)
    try:
        return Queue(engine).rows()
    finally:
        engine.dispose()


def destination(db_url: str, url: str):  # type: ignore[no-untyped-def]
    """The recorded state of ``--dicomweb-url URL`` (the destination named default)."""
    engine = make_engine(db_url)
    try:
        state = Queue(engine).destination(DEFAULT_DESTINATION)
    finally:
        engine.dispose()
    assert state is None or state.url == url
    return state


def all_done(db_url: str, n: int) -> bool:
    current = rows(db_url)
    return len(current) == n and all(r.status == Status.DONE for r in current)


def seed(tmp_path: Path, db_url: str, n: int, seed_value: int = 1) -> list[Path]:
    files = make_study(tmp_path / "study", n, seed=seed_value)
    seed_queue(db_url, tmp_path / "data", files)
    return files


def test_happy_path_every_instance_confirmed(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    files = seed(tmp_path, db_url, 12)
    proc = stowaway("forward", "--dicomweb-url", stub.base_url, *FAST, "--batch-max-instances", "5")
    wait_until(lambda: all_done(db_url, 12))
    assert set(stub.stored) == {read_uids(f).sop_uid for f in files}
    posts = [r for r in stub.requests if r.method == "POST"]
    assert len(posts) < 12  # batched: several instances per STOW-RS request
    assert all(r.attempts == 0 and r.last_error is None for r in rows(db_url))
    assert proc.stop() == 0
    assert not list((tmp_path / "data" / "spool").glob("[0-9]*/*/*/*/*.dcm"))


@pytest.mark.parametrize(
    ("fault", "cause"),
    [
        (Fault.service_disabled, "not enabled"),
        (Fault.insufficient_scopes, "scope"),
        (Fault.iam_denied, "roles/healthcare.dicomEditor"),
    ],
)
def test_403_blocks_the_destination_without_burning_attempts(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    tmp_path: Path,
    db_url: str,
    fault,
    cause: str,  # type: ignore[no-untyped-def]
) -> None:
    seed(tmp_path, db_url, 4)
    stub.script(fault(times=4))
    proc = stowaway("forward", "--dicomweb-url", stub.base_url, *FAST)
    wait_until(lambda: "destination_blocked" in proc.log())
    state = destination(db_url, stub.base_url)
    assert state is not None and state.state == DestinationState.BLOCKED
    assert cause in (state.reason or "")
    assert cause in proc.log()
    assert all(r.attempts == 0 and r.status != Status.FAILED for r in rows(db_url))
    # The operator fixes IAM: the queue drains by itself.
    wait_until(lambda: all_done(db_url, 4), timeout=60)
    assert "destination_unblocked" in proc.log()
    assert proc.log().count("destination_blocked") == 1  # one line per state change
    state = destination(db_url, stub.base_url)
    assert state is not None and state.state == DestinationState.OK
    assert len(stub.stored) == 4


def test_429_retry_after_is_honoured(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    seed(tmp_path, db_url, 1)
    stub.script(Fault.http(429, retry_after="2", body='{"error": {"code": 429}}'))
    stowaway("forward", "--dicomweb-url", stub.base_url, *FAST, "--backoff-max", "10s")
    wait_until(lambda: all_done(db_url, 1), timeout=30)
    posts = [r for r in stub.requests if r.method == "POST"]
    assert len(posts) == 2
    gap = posts[1].time - posts[0].time
    assert gap >= 1.9, gap
    [row] = rows(db_url)
    assert row.attempts == 1 and row.status == Status.DONE


def test_a_429_storm_gets_next_to_no_requests_while_retry_after_lasts(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    seed(tmp_path, db_url, 40)
    storm, retry_after = 5.0, 2.0
    stub.script(Fault.http(429, retry_after=f"{retry_after:g}", times=1_000_000))
    stowaway(
        "forward",
        "--dicomweb-url",
        stub.base_url,
        *FAST,
        "--backoff-max",
        "10s",
        "--batch-max-instances",
        "1",  # one request per instance: 40 due rows could make 40 requests at once
        "--workers",
        "4",
        "--max-workers",
        "8",
    )
    wait_until(lambda: any(r.method == "POST" for r in stub.requests), timeout=30)
    start = stub.requests[0].time
    time.sleep(storm - (time.monotonic() - start))
    stub.fault = None
    during = [r for r in stub.requests if r.method == "POST" and r.time < start + storm]
    # The first requests in flight together, then about one per Retry-After (the
    # limit halves each time): not one per due row.
    assert len(during) <= 4 + 2 * storm / retry_after, [round(r.time - start, 2) for r in during]
    wait_until(lambda: all_done(db_url, 40), timeout=60)
    assert len(stub.stored) == 40


def test_503_window_then_success(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    seed(tmp_path, db_url, 3)
    stub.script(Fault.http(503, times=3))
    proc = stowaway("forward", "--dicomweb-url", stub.base_url, *FAST)
    wait_until(lambda: all_done(db_url, 3))
    # Each instance counts one attempt per 503 it was part of.
    refused = Counter(u for r in stub.requests[:3] for u in r.sop_instance_uids)
    assert {r.sop_instance_uid: r.attempts for r in rows(db_url)} == {
        r.sop_instance_uid: refused.get(r.sop_instance_uid, 0) for r in rows(db_url)
    }
    assert "instance_retry" in proc.log()
    assert len(stub.stored) == 3


@pytest.mark.parametrize(
    "fault", [Fault.reset(read_bytes=100), Fault.reset(), Fault.accept_then_drop()]
)
def test_connection_cut_mid_request_is_retried(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str, fault: Fault
) -> None:
    files = seed(tmp_path, db_url, 2)
    stub.script(fault)
    stowaway("forward", "--dicomweb-url", stub.base_url, *FAST)
    wait_until(lambda: all_done(db_url, 2))
    assert set(stub.stored) == {read_uids(f).sop_uid for f in files}
    assert all(r.attempts == 1 for r in rows(db_url))


def test_response_slower_than_the_read_timeout(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    seed(tmp_path, db_url, 1)
    stub.script(Fault.slow(3.0))
    proc = stowaway("forward", "--dicomweb-url", stub.base_url, *FAST, "--read-timeout", "1s")
    wait_until(lambda: all_done(db_url, 1), timeout=30)
    assert "timed out" in proc.log().lower() or "timeout" in proc.log().lower()
    [row] = rows(db_url)
    assert row.attempts == 1


def test_partial_failure_is_decided_per_instance(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    files = seed(tmp_path, db_url, 3)
    refused = read_uids(files[1]).sop_uid
    stub.script(Fault.partial_failure(refused, reason=0xC000))
    stowaway("forward", "--dicomweb-url", stub.base_url, *FAST)
    wait_until(lambda: {r.status for r in rows(db_url)} == {Status.DONE, Status.FAILED})
    by_uid = {r.sop_instance_uid: r for r in rows(db_url)}
    assert by_uid[refused].status == Status.FAILED
    assert "c000" in (by_uid[refused].last_error or "").lower()
    assert all(r.status == Status.DONE for u, r in by_uid.items() if u != refused)
    # A failed row keeps its file for the operator.
    assert (tmp_path / "data" / "spool" / by_uid[refused].spool_path).is_file()


def test_partial_failure_out_of_resources_is_transient(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    files = seed(tmp_path, db_url, 3)
    busy = read_uids(files[0]).sop_uid
    stub.script(Fault.partial_failure(busy, reason=0xA700))
    stowaway("forward", "--dicomweb-url", stub.base_url, *FAST)
    wait_until(lambda: all_done(db_url, 3))
    assert {r.sop_instance_uid: r.attempts for r in rows(db_url)}[busy] == 1


def test_failure_without_uid_in_a_batch_is_pinned_by_sending_alone(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    # Google answers an instance it cannot parse with a failed item that carries no
    # UID: in a request of several, whose failure it is cannot be read off the answer.
    files = seed(tmp_path, db_url, 4)
    bad = read_uids(files[2]).sop_uid
    stub.script(Fault.unnamed_failure(bad, times=100))
    stowaway("forward", "--dicomweb-url", stub.base_url, *FAST)
    wait_until(lambda: {r.status for r in rows(db_url)} == {Status.DONE, Status.FAILED})
    by_uid = {r.sop_instance_uid: r for r in rows(db_url)}
    assert by_uid[bad].status == Status.FAILED
    assert "scripted failure without UIDs" in (by_uid[bad].last_error or "")
    assert set(stub.stored) == set(by_uid) - {bad}
    # Resolved in the same cycle: no retry was scheduled for the ambiguous answer.
    assert not any("unnamed" in (r.last_error or "") for r in by_uid.values())
    posts = [r.sop_instance_uids for r in stub.requests if r.method == "POST"]
    assert len(posts[0]) == 4 and bad in posts[0]
    assert sorted(posts[1:]) == sorted((u,) for u in by_uid)


@pytest.mark.parametrize("overwrite", [False, True])
def test_409_conflict(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str, overwrite: bool
) -> None:
    ct = make_ct(tmp_path / "ct.dcm", seed=3)
    uid = read_uids(ct).sop_uid
    stub.stored[uid] = b"different bytes already stored under this UID"
    seed_queue(db_url, tmp_path / "data", [ct])
    extra = ("--on-conflict", "overwrite") if overwrite else ()
    stowaway("forward", "--dicomweb-url", stub.base_url, *FAST, *extra)
    wait_until(lambda: rows(db_url)[0].status in (Status.DONE, Status.FAILED))
    [row] = rows(db_url)
    if overwrite:
        assert row.status == Status.DONE
        assert any(r.method == "DELETE" for r in stub.requests)
        assert stub.stored[uid] != b"different bytes already stored under this UID"
    else:
        assert row.status == Status.FAILED
        assert "409" in (row.last_error or "") or "0111" in (row.last_error or "")
        assert "already exists" in (row.last_error or "")
        assert not any(r.method == "DELETE" for r in stub.requests)


def test_corrupted_spool_file_is_failed_not_uploaded(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    seed(tmp_path, db_url, 2)
    victim = rows(db_url)[0]
    path = tmp_path / "data" / "spool" / victim.spool_path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    stowaway("forward", "--dicomweb-url", stub.base_url, *FAST)
    wait_until(lambda: {r.status for r in rows(db_url)} == {Status.DONE, Status.FAILED})
    failed = [r for r in rows(db_url) if r.status == Status.FAILED]
    assert [r.id for r in failed] == [victim.id]
    assert "checksum" in (failed[0].last_error or "")
    assert victim.sop_instance_uid not in stub.stored


def test_max_attempts_turns_transient_into_failed(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    seed(tmp_path, db_url, 1)
    stub.script(Fault.http(503, times=100))
    stowaway("forward", "--dicomweb-url", stub.base_url, *FAST, "--max-attempts", "3")
    wait_until(lambda: rows(db_url)[0].status == Status.FAILED)
    [row] = rows(db_url)
    assert row.attempts == 3
    assert "gave up after 3 attempts" in (row.last_error or "")


def test_google_auth_with_the_metadata_server(
    stowaway: StowawayFactory, tmp_path: Path, db_url: str
) -> None:
    # token-1 lives 60 s, inside google-auth's refresh margin: the next request
    # must carry a refreshed token-2.
    with MetadataServer(expires_in=(60, 3600)) as metadata, HealthcareStub() as stub:
        seed(tmp_path, db_url, 3)
        env = {**metadata.environ(), "GOOGLE_APPLICATION_CREDENTIALS": ""}
        proc = stowaway(
            "forward",
            "--dicomweb-url",
            stub.base_url,
            "--poll-interval",
            "50ms",
            "--auth",
            "google",
            "--workers",
            "1",
            "--batch-max-instances",
            "1",
            env=env,
        )
        wait_until(lambda: all_done(db_url, 3), timeout=60)
        tokens = [r.header("Authorization") for r in stub.requests if r.method == "POST"]
        assert tokens[0] == "Bearer token-1"
        assert tokens[1:] == ["Bearer token-2"] * (len(tokens) - 1)
        assert metadata.issued == 2
        assert "token-1" not in proc.log() and "token-2" not in proc.log()


def test_kill_9_during_upload_resends_after_restart(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    files = seed(tmp_path, db_url, 1)
    stub.script(Fault.slow(30.0))
    first = stowaway("forward", "--dicomweb-url", stub.base_url, *FAST, "--lease", "2s")
    wait_until(lambda: any(r.method == "POST" for r in stub.requests))
    first.kill()
    assert rows(db_url)[0].status == Status.IN_FLIGHT
    stub.script()  # healthy again
    stowaway("forward", "--dicomweb-url", stub.base_url, *FAST, "--lease", "2s")
    wait_until(lambda: all_done(db_url, 1), timeout=30)
    assert read_uids(files[0]).sop_uid in stub.stored


@pytest.mark.postgres
@pytest.mark.parametrize("forwarders", [2, 3])
def test_several_forwarders_on_postgres_share_the_queue(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, forwarders: int
) -> None:
    with postgres_database() as pg_url:
        files = make_study(tmp_path / "study", 60, seed=11)
        seed_queue(pg_url, tmp_path / "data", files)
        procs = [
            stowaway(
                "forward",
                "--dicomweb-url",
                stub.base_url,
                *FAST,
                "--db-url",
                pg_url,
                "--batch-max-instances",
                "3",
            )
            for _ in range(forwarders)
        ]
        wait_until(lambda: all_done(pg_url, 60), timeout=90)
        for proc in procs:
            assert proc.stop() == 0
    uploads = Counter(
        uid for r in stub.requests if r.method == "POST" for uid in r.sop_instance_uids
    )
    assert set(uploads) == {read_uids(f).sop_uid for f in files}
    assert max(uploads.values()) == 1  # no row was ever held by two forwarders
    time.sleep(0)


def test_sigterm_lets_the_upload_in_flight_finish(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    seed(tmp_path, db_url, 1)
    stub.script(Fault.slow(1.5))
    proc = stowaway("forward", "--dicomweb-url", stub.base_url, *FAST, "--grace-period", "10s")
    wait_until(lambda: any(r.method == "POST" for r in stub.requests))
    assert proc.stop() == 0
    assert all_done(db_url, 1)


def test_sigterm_past_the_grace_period_gives_the_rows_back(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    seed(tmp_path, db_url, 1)
    stub.script(Fault.slow(20.0))
    proc = stowaway("forward", "--dicomweb-url", stub.base_url, *FAST, "--grace-period", "1s")
    wait_until(lambda: any(r.method == "POST" for r in stub.requests))
    started = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - started < 10
    [row] = rows(db_url)
    assert row.status == Status.PENDING and row.lease_owner is None and row.attempts == 0


def test_keep_done_expires_files_after_the_retention(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    seed(tmp_path, db_url, 3)
    spool = tmp_path / "data" / "spool"
    proc = stowaway(
        "forward", "--dicomweb-url", stub.base_url, *FAST, "--keep-done", "2s", "--lease", "3s"
    )
    wait_until(lambda: all_done(db_url, 3))
    assert len(list(spool.glob("[0-9]*/*/*/*/*.dcm"))) == 3  # kept for now
    wait_until(lambda: not list(spool.glob("[0-9]*/*/*/*/*.dcm")), timeout=20)
    assert "done_files_expired" in proc.log()


def test_serve_lets_a_transfer_finish_before_uploading(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, db_url: str
) -> None:
    # Default --sender-first: uploads wait while instances keep arriving, so the
    # sender does not share the CPU with them; then everything goes.
    files = make_study(tmp_path / "study", 60, seed=12)
    proc = stowaway("serve", "--dicomweb-url", stub.base_url, *FAST)
    started = time.monotonic()
    result = dcmsend(proc.port, files)  # one association, back to back
    answered = time.monotonic()
    assert result.returncode == 0, result.stderr
    wait_until(lambda: all_done(db_url, 60), timeout=60)
    uploads = [r.time for r in stub.requests if r.method == "POST"]
    assert uploads and min(uploads) > answered - 0.25, (
        f"first upload {min(uploads) - started:.2f} s into a transfer answered "
        f"after {answered - started:.2f} s"
    )
