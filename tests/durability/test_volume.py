"""Size and number: one huge instance, thousands of tiny ones, many associations at once.

* A 256 MiB instance (1 GiB with ``--soak``) goes through ``serve`` into the
  Healthcare API stub while the peak resident memory (VmHWM) of the stowaway
  process stays flat: receive, spool, hash and upload all stream.
* Thousands of tiny instances on a single association.
* 16 associations sending at the same time.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dsutils import encode

from tests.conftest import StowawayFactory
from tests.durability.harness import (
    FAST_FORWARD,
    SUCCESS,
    Corpus,
    Ledger,
    NoDestination,
    Scenario,
    ScenarioFactory,
    StubDestination,
    Target,
    backend,
    drained,
    end,
    env_int,
    join_all,
    peak_rss_bytes,
    scaled,
    send_file,
    start_senders,
    write_part10,
)
from tests.support.databases import postgres_database
from tests.support.healthcare_stub import HealthcareStub
from tests.support.seeding import wait_until

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore::ResourceWarning")]

MiB = 1 << 20


@pytest.fixture
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """SQLite, unless a test asks for Postgres too (indirect parametrization)."""
    if getattr(request, "param", "sqlite") == "postgres":
        with postgres_database() as url:
            yield url
    else:
        yield request.getfixturevalue("sqlite_db_url")


def make_big_instance(path: Path, pixel_bytes: int, seed: int) -> tuple[str, str]:
    """A CT whose PixelData is ``pixel_bytes`` long, written in 1 MiB pieces;
    returns its SOP Instance UID and the SHA-256 of its dataset bytes."""
    ds = Corpus(f"big-{seed}", 1).dataset(0)
    del ds.PixelData
    pixels = pixel_bytes // 2
    ds.Rows = 1 << ((pixels.bit_length() - 1) // 2)
    ds.Columns = pixels // ds.Rows
    assert ds.Rows * ds.Columns * 2 == pixel_bytes and ds.Rows <= 65535 and ds.Columns <= 65535
    head = encode(ds, False, True)
    assert head is not None
    head += b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", pixel_bytes)
    block = random.Random(seed).randbytes(MiB)

    def body():  # type: ignore[no-untyped-def]
        yield head
        for k in range(pixel_bytes // MiB):
            yield block[k % 251 :] + block[: k % 251]  # no two pieces alike

    digest = write_part10(path, CTImageStorage, str(ds.SOPInstanceUID), body())
    return str(ds.SOPInstanceUID), digest


def big_instance_scenario(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    run: Scenario,
    tmp_path: Path,
    size: int,
) -> None:
    ledger, db_url = run.ledger, run.db_url
    big = tmp_path / "big.dcm"
    uid, digest = make_big_instance(big, size, run.seed)
    proc = stowaway("serve", "--dicomweb-url", stub.base_url, *FAST_FORWARD, "--read-timeout", "5m")
    assert proc.proc is not None
    pid = proc.proc.pid
    # Baseline: the process after it has received and forwarded a small instance.
    small = start_senders(
        Corpus(f"{run.name}-small", 3), Target(proc.port), ledger, 1, deadline=time.monotonic() + 30
    )
    assert join_all(small, 30) == 0
    wait_until(lambda: len(stub.stored) == 3, timeout=30)
    baseline = peak_rss_bytes(pid)

    started = time.monotonic()
    status = send_file(proc.port, big, context=(CTImageStorage, ExplicitVRLittleEndian))
    received = time.monotonic() - started
    ledger.record_expected(uid, digest, acked=status == SUCCESS)
    assert status == SUCCESS
    after_receive = peak_rss_bytes(pid)
    wait_until(lambda: uid in stub.stored and drained(db_url), timeout=240, interval=0.5)
    forwarded = time.monotonic() - started
    peak = peak_rss_bytes(pid)
    end(proc)
    report = run.check(
        StubDestination(stub),
        instance_mib=size // MiB,
        baseline_rss_mib=baseline // MiB,
        peak_rss_after_receive_mib=after_receive // MiB,
        peak_rss_mib=peak // MiB,
        receive_s=round(received, 1),
        forward_s=round(forwarded, 1),
    )
    assert report.in_destination == 4
    # Flat: the instance never sits in memory, not even in pieces of its size.
    assert peak - baseline < 64 * MiB, f"peak RSS grew by {(peak - baseline) // MiB} MiB"


def test_256_mib_instance_with_flat_memory(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    db_url: str,
    tmp_path: Path,
    scenario: ScenarioFactory,
) -> None:
    size = scaled(256) * MiB
    big_instance_scenario(stowaway, stub, scenario("big-instance", db_url), tmp_path, size)


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_1_gib_instance_with_flat_memory(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    db_url: str,
    tmp_path: Path,
    scenario: ScenarioFactory,
) -> None:
    size = env_int("STOWAWAY_SOAK_BIG_MIB", 1024) * MiB
    big_instance_scenario(stowaway, stub, scenario("soak-big-instance", db_url), tmp_path, size)


def test_thousands_of_tiny_instances_on_one_association(
    stowaway: StowawayFactory,
    ledger: Ledger,
    db_url: str,
    scenario: ScenarioFactory,
) -> None:
    run = scenario("tiny-one-association", db_url)
    count = scaled(1000)
    corpus = run.corpus(count, rows=4, cols=4, per_study=500)
    proc = stowaway("receive")
    started = time.monotonic()
    [sender] = start_senders(corpus, Target(proc.port), ledger, 1, deadline=started + 200)
    assert join_all([sender], 220) == 0
    seconds = time.monotonic() - started
    assert sender.associations == 1
    end(proc)
    report = run.check(
        NoDestination(), seconds=round(seconds, 1), per_second=round(count / seconds)
    )
    assert report.waiting_pending == count


@pytest.mark.parametrize(
    "db_url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_sixteen_concurrent_associations(
    stowaway: StowawayFactory,
    stub: HealthcareStub,
    ledger: Ledger,
    db_url: str,
    scenario: ScenarioFactory,
) -> None:
    run = scenario(f"concurrent-16-{backend(db_url)}", db_url)
    per_sender = scaled(20)
    corpus = run.corpus(16 * per_sender, per_study=per_sender)
    proc = stowaway("serve", "--dicomweb-url", stub.base_url, *FAST_FORWARD)
    started = time.monotonic()
    senders = start_senders(corpus, Target(proc.port), ledger, 16, deadline=started + 120)
    # All 16 associations are open at the same time.
    wait_until(lambda: sum(s.associations for s in senders) == 16, timeout=30)
    assert join_all(senders, 150) == 0
    seconds = time.monotonic() - started
    assert [s.associations for s in senders] == [1] * 16
    wait_until(lambda: drained(db_url), timeout=60, interval=0.25)
    end(proc)
    report = run.check(StubDestination(stub), seconds=round(seconds, 1))
    assert report.in_destination == corpus.count
