"""A big instance is redacted on the way out with flat memory: ``stowaway serve`` receives it,
redacts it for a DICOMweb destination (the header rewritten, the pixel data streamed from the
spool into the request) and its peak resident memory (VmHWM) stays far below the instance's
size. 128 MiB in the default run; 1 GiB under 200 MB with ``--soak``."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from stowaway.db.engine import make_engine
from stowaway.db.migrate import upgrade_to_head
from stowaway.forwarder.deidentify.uids import google_uid
from tests.conftest import StowawayFactory
from tests.support.databases import sqlite_url
from tests.support.dicom_files import make_ct
from tests.support.healthcare_stub import HealthcareStub
from tests.support.phi_instances import PHI_NAME, write_sparse_ct
from tests.support.processes import dcmsend
from tests.support.seeding import wait_until

MiB = 1 << 20
FAST = ("--poll-interval", "100ms", "--backoff-initial", "200ms", "--backoff-max", "1s")


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: memory is the point here, not the queue."""
    url = sqlite_url(tmp_path)
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    return url


@pytest.fixture
def stub() -> Iterator[HealthcareStub]:
    with HealthcareStub() as s:
        yield s


def peak_rss(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    assert match
    return int(match.group(1)) * 1024


def redact_big_instance(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path, size: int
) -> tuple[int, int]:
    """Send a small instance (the baseline) then one of ``size`` pixel bytes through a
    CHC_BASIC destination; returns (baseline, peak) VmHWM of the serve process."""
    config = tmp_path / "destinations.yaml"
    config.write_text(
        "destinations:\n"
        f"  - name: research\n    kind: dicomweb\n    url: '{stub.base_url}'\n    auth: none\n"
        "    redact: {profile: CHC_BASIC, uid_scheme: google}\n"
        "default: research\n"
    )
    proc = stowaway(
        "serve", "--destinations", str(config), "--sender-first", "0", "--read-timeout", "5m", *FAST
    )
    assert proc.proc is not None
    small = make_ct(tmp_path / "small.dcm", 64, 64, seed=5, patient_name=PHI_NAME)
    assert dcmsend(proc.port, [small]).returncode == 0
    wait_until(lambda: len(stub.stored) == 1, 30)
    baseline = peak_rss(proc.proc.pid)

    big = tmp_path / "big.dcm"
    write_sparse_ct(big, size)
    header = pydicom.dcmread(big, stop_before_pixels=True)
    sent = dcmsend(proc.port, [big], timeout=600)
    assert sent.returncode == 0, sent.stderr
    new_uid = google_uid(str(header.SOPInstanceUID))
    wait_until(lambda: new_uid in stub.stored, 600, interval=0.5)
    peak = peak_rss(proc.proc.pid)
    stored = stub.stored[new_uid]
    stub.stored.clear()
    copy = pydicom.dcmread(io.BytesIO(stored), stop_before_pixels=True)
    assert copy.PatientName == ""
    assert len(stored) > size
    del stored
    return baseline, peak


def test_a_128_mib_instance_is_redacted_on_the_way_out_with_flat_memory(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path
) -> None:
    baseline, peak = redact_big_instance(stowaway, stub, tmp_path, 128 * MiB)
    print(f"baseline {baseline / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB")
    assert peak - baseline < 40 * MiB, f"peak {peak // MiB} MiB, baseline {baseline // MiB} MiB"


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_a_1_gib_instance_is_redacted_with_peak_rss_under_200_mb(
    stowaway: StowawayFactory, stub: HealthcareStub, tmp_path: Path
) -> None:
    baseline, peak = redact_big_instance(stowaway, stub, tmp_path, 1024 * MiB)
    print(f"baseline {baseline / MiB:.0f} MiB, peak {peak / MiB:.0f} MiB")
    assert peak < 200 * 10**6, f"peak {peak // MiB} MiB"
