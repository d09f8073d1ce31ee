"""De-identification and compression per destination, end to end: one ``stowaway serve``,
one C-STORE stream, a clinical Orthanc that gets the originals, a research Orthanc that gets
DICOM_BASIC copies (keyed UIDs) and a teaching DICOM node that gets CHC_BASIC copies with
Google's UIDs, compressed to JPEG-LS. Sent twice, nothing changes in either store."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from stowaway.db.engine import make_engine
from stowaway.db.migrate import upgrade_to_head
from stowaway.db.queue import Queue
from stowaway.forwarder.deidentify import (
    MAPPED_UIDS,
    RedactionSpec,
    Redactor,
    UidMapper,
    UidScheme,
)
from stowaway.forwarder.deidentify.profiles import chc_basic_tags, is_private
from stowaway.forwarder.deidentify.uids import google_uid
from tests.conftest import StowawayFactory
from tests.support.databases import sqlite_url
from tests.support.dicom_files import make_ct, uid_for
from tests.support.orthanc import OrthancServer, orthanc_available
from tests.support.phi_instances import PHI_ID, PHI_NAME, make_phi_ct
from tests.support.processes import StowawayProcess, dcmsend, free_port, run_cli, storescp
from tests.support.profile_check import check_against_profile
from tests.support.seeding import wait_until

pytestmark = pytest.mark.timeout(240)

FAST = ("--poll-interval", "100ms", "--backoff-initial", "200ms", "--backoff-max", "1s")
KEY = b"end-to-end-test-key-0123456789abcdef"


@pytest.fixture
def research(tmp_path: Path) -> Iterator[OrthancServer]:
    if not orthanc_available():
        pytest.skip("Orthanc not installed")
    server = OrthancServer(tmp_path / "research", aet="RESEARCH", http_port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def teaching(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A DICOM node taking compressed syntaxes too (storescp +xa)."""
    with storescp(tmp_path / "teaching", "TEACHING", "+xa") as port:
        yield port, tmp_path / "teaching"


def study(directory: Path) -> list[Path]:
    """Two instances of one study referring to each other, and one of another study."""
    directory.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = uid_for("e2e-study"), uid_for("e2e-series")
    sop_b = uid_for("sop", 0, study_uid, series_uid, 2)
    a = make_phi_ct(
        directory / "a.dcm",
        instance_number=1,
        study_uid=study_uid,
        series_uid=series_uid,
        referenced_sop_uid=sop_b,
        rows=32,
        cols=32,
    )
    sop_a = str(pydicom.dcmread(a).SOPInstanceUID)
    b = make_phi_ct(
        directory / "b.dcm",
        instance_number=2,
        study_uid=study_uid,
        series_uid=series_uid,
        referenced_sop_uid=sop_a,
        rows=32,
        cols=32,
    )
    c = make_phi_ct(directory / "c.dcm", seed=7, rows=48, cols=40)
    return [a, b, c]


def as_sent(path: Path) -> pydicom.Dataset:
    """The instance as dcmsend sends it (DCMTK leaves out the trailing padding)."""
    ds = pydicom.dcmread(path)
    if "DataSetTrailingPadding" in ds:
        del ds.DataSetTrailingPadding
    return ds


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def destinations(tmp_path: Path, clinical: str, research: str, teaching_port: int) -> Path:
    key = tmp_path / "uid.key"
    key.write_bytes(KEY)
    path = tmp_path / "destinations.yaml"
    path.write_text(
        f"""
destinations:
  - {{name: clinical, kind: dicomweb, url: "{clinical}", auth: none}}
  - name: research
    kind: dicomweb
    url: "{research}"
    auth: none
    redact: {{profile: DICOM_BASIC, uid_key_file: "{key}"}}
  - name: teaching
    kind: dimse
    host: 127.0.0.1
    port: {teaching_port}
    called_aet: TEACHING
    redact: {{profile: CHC_BASIC, uid_scheme: google}}
    transcode: {JPEGLSLossless}
matching: all
rules:
  - {{name: everything, to: [clinical, research, teaching]}}
"""
    )
    return path


def queue_rows(proc: StowawayProcess) -> list[dict[str, Any]]:
    """The queue's rows, read from its database (a CLI process per poll is slow)."""
    engine = make_engine(proc.db_url)
    try:
        return [row.to_json() for row in Queue(engine).rows()]
    finally:
        engine.dispose()


def all_done(proc: StowawayProcess, count: int) -> bool:
    rows = queue_rows(proc)
    return len(rows) == count and all(r["status"] == "done" for r in rows)


def show(proc: StowawayProcess, target: object) -> Any:
    """``queue show ID|SOP_INSTANCE_UID --json``: a row, or every row of the instance."""
    return json.loads(proc.cli("queue", "show", str(target), "--json").stdout)


def test_one_stream_gives_the_clinical_store_originals_and_the_research_stores_deidentified_copies(
    stowaway: StowawayFactory,
    orthanc: OrthancServer,
    research: OrthancServer,
    teaching: tuple[int, Path],
    tmp_path: Path,
) -> None:
    teaching_port, teaching_dir = teaching
    files = study(tmp_path / "in")
    originals = {sop_uid(p): p for p in files}
    config = destinations(tmp_path, orthanc.dicomweb_url, research.dicomweb_url, teaching_port)
    proc = stowaway("serve", "--destinations", str(config), "--sender-first", "0", *FAST)
    sent = dcmsend(proc.port, files)
    assert sent.returncode == 0, sent.stderr

    keyed = Redactor(
        RedactionSpec.from_config({"profile": "DICOM_BASIC", "uid_key_file": "k"}),
        UidMapper(UidScheme.KEYED, KEY),
    )
    mapped = {keyed.mapper.map(uid): uid for uid in originals}
    wait_until(lambda: orthanc.instance_uids() == set(originals), 60)
    wait_until(lambda: research.instance_uids() == set(mapped), 60)
    wait_until(lambda: len(list(teaching_dir.iterdir())) == 3, 60)
    wait_until(lambda: all_done(proc, 9), 30)

    # clinical: the originals, byte for byte: the spooled file (its SHA-256 in the row,
    # the receiver's file meta), holding every element as sent
    rows = queue_rows(proc)
    spooled = {r["sop_instance_uid"]: r["sha256"] for r in rows if r["destination"] == "clinical"}
    for uid, path in originals.items():
        stored_bytes = orthanc.instance_bytes(uid)
        assert hashlib.sha256(stored_bytes).hexdigest() == spooled[uid], uid
        assert list(pydicom.dcmread(io.BytesIO(stored_bytes))) == list(as_sent(path)), uid

    # research: DICOM_BASIC's table holds element by element, pixels untouched
    for new_uid, uid in mapped.items():
        original = pydicom.dcmread(originals[uid])
        stored = pydicom.dcmread(io.BytesIO(research.instance_bytes(new_uid)))
        assert check_against_profile(keyed, original, stored, keyed.mapper, "") > 60
        assert not any(is_private(int(e.tag)) for e in stored)
        assert stored.PixelData == original.PixelData
        assert stored.PatientIdentityRemoved == "YES"
        text = repr(stored)
        assert PHI_NAME not in text and PHI_ID not in text and "General Hospital" not in text

    # research: the study's two instances still point at each other, under their new UIDs
    a, b, _ = files
    new_a, new_b = keyed.mapper.map(sop_uid(a)), keyed.mapper.map(sop_uid(b))
    stored_a = pydicom.dcmread(io.BytesIO(research.instance_bytes(new_a)))
    stored_b = pydicom.dcmread(io.BytesIO(research.instance_bytes(new_b)))
    assert stored_a.StudyInstanceUID == stored_b.StudyInstanceUID
    assert stored_a.StudyInstanceUID == keyed.mapper.map(str(pydicom.dcmread(a).StudyInstanceUID))
    assert stored_a.SeriesInstanceUID == stored_b.SeriesInstanceUID
    assert stored_a.FrameOfReferenceUID == stored_b.FrameOfReferenceUID
    assert stored_a.ReferencedImageSequence[0].ReferencedSOPInstanceUID == new_b
    assert stored_b.SourceImageSequence[0].ReferencedSOPInstanceUID == new_a

    # teaching: CHC_BASIC with Google's UIDs, JPEG-LS Lossless decoding to the same pixels
    chc = Redactor(RedactionSpec.from_config({"profile": "CHC_BASIC", "uid_scheme": "google"}))
    by_uid = {}
    for received in teaching_dir.iterdir():
        ds = pydicom.dcmread(received)
        by_uid[str(ds.SOPInstanceUID)] = ds
    assert set(by_uid) == {google_uid(uid) for uid in originals}
    for uid, path in originals.items():
        ds = by_uid[google_uid(uid)]
        original = as_sent(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
        np.testing.assert_array_equal(ds.pixel_array, original.pixel_array)
        for tag in chc_basic_tags() & set(original.keys()):
            name = pydicom.datadict.keyword_for_tag(tag)
            if tag in MAPPED_UIDS:  # replaced, not emptied (docs/deidentification.md)
                assert ds[tag].value == google_uid(str(original[tag].value)), name
            else:
                assert tag in ds and ds[tag].is_empty, name
        assert check_against_profile(chc, original, ds, chc.mapper, "") > 60

    # queue show says what each delivery got
    uid_c = sop_uid(files[2])
    applied = {r["destination"]: r["applied"] for r in show(proc, uid_c)}  # its 3 deliveries
    clinical, res, teach = (applied[d] for d in ("clinical", "research", "teaching"))
    assert clinical is None
    assert isinstance(res, dict) and res["redact"]["profile"] == "DICOM_BASIC"
    assert res["redact"]["uid_scheme"] == "keyed"
    assert res["redact"]["sop_instance_uid"] == keyed.mapper.map(uid_c)
    assert isinstance(teach, dict) and teach["transcode"]["applied"] is True
    assert teach["transcode"]["transfer_syntax"] == JPEGLSLossless
    assert teach["redact"]["uid_scheme"] == "google"
    text = proc.cli(
        "queue", "show", str(next(r["id"] for r in rows if r["destination"] == "research"))
    ).stdout
    assert re.search(r"applied\s+redacted DICOM_BASIC \(uid keyed\)", text), text

    # the spool kept the originals: every delivery's row has the clinical copy's checksum
    assert all(r["sha256"] == spooled[r["sop_instance_uid"]] for r in rows)

    # sent again: one instance each at the stores, the same bytes
    before = {uid: research.instance_bytes(uid) for uid in mapped}
    again = dcmsend(proc.port, files)
    assert again.returncode == 0, again.stderr
    wait_until(lambda: all_done(proc, 18), 60)
    assert research.instance_uids() == set(mapped)
    assert orthanc.instance_uids() == set(originals)
    assert {uid: research.instance_bytes(uid) for uid in mapped} == before
    assert all(r["status"] == "done" for r in queue_rows(proc))


def test_googles_flags_work_unchanged_with_googles_uids_and_one_warning(
    stowaway: StowawayFactory, research: OrthancServer, tmp_path: Path
) -> None:
    plain = make_phi_ct(tmp_path / "plain.dcm", rows=32, cols=32)
    # already compressed: cannot be transcoded, goes as received, counted
    packed = make_ct(tmp_path / "packed.dcm", 32, 32, seed=9)
    ds = pydicom.dcmread(packed)
    ds.compress(RLELossless)
    ds.save_as(packed, enforce_file_format=True)
    proc = stowaway(
        "serve",
        "--dicomweb_address",
        research.dicomweb_url,
        "--redact_filter_profile=CHC_BASIC",
        f"--store_compress_to_transfer_syntax={JPEG2000Lossless}",
        "--sender-first",
        "0",
        *FAST,
    )
    sent = dcmsend(proc.port, [plain, packed])
    assert sent.returncode == 0, sent.stderr
    expected = {google_uid(sop_uid(plain)), google_uid(sop_uid(packed))}
    wait_until(lambda: research.instance_uids() == expected, 60)
    wait_until(lambda: all_done(proc, 2), 30)

    stored = pydicom.dcmread(io.BytesIO(research.instance_bytes(google_uid(sop_uid(plain)))))
    assert stored.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert stored.PatientName == "" and stored.PatientID == ""
    assert stored.StudyInstanceUID == google_uid(str(pydicom.dcmread(plain).StudyInstanceUID))
    np.testing.assert_array_equal(stored.pixel_array, pydicom.dcmread(plain).pixel_array)
    kept = pydicom.dcmread(io.BytesIO(research.instance_bytes(google_uid(sop_uid(packed)))))
    assert kept.file_meta.TransferSyntaxUID == RLELossless  # as received

    log = proc.log()
    assert log.count("redaction_uids_unkeyed") == 1
    assert "--redact-uid-key-file" in log
    assert "transcode_skipped" in log and "already compressed" in log
    metrics = requests.get(f"http://127.0.0.1:{proc.http_port}/metrics", timeout=10).text
    assert (
        'stowaway_outbound_events_total{destination="default",event="transcode_skipped"} 1.0'
        in metrics
    )
    row = next(r for r in queue_rows(proc) if r["sop_instance_uid"] == sop_uid(packed))
    applied = show(proc, row["id"])["applied"]
    assert isinstance(applied, dict)
    assert applied["transcode"]["applied"] is False
    assert "already compressed" in applied["transcode"]["reason"]


def test_a_missing_uid_key_file_stops_start_up_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.key"
    result = run_cli(
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--dicomweb-url",
        "http://127.0.0.1:9/dicom-web",
        "--redact_filter_profile=CHC_BASIC",
        "--redact-uid-key-file",
        str(missing),
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--redact-uid-key-file" in lines[0] and str(missing) in lines[0]


def test_check_reports_each_destinations_redaction_and_fails_on_a_missing_key_file(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    from tests.integration.test_operator_check import check

    key = tmp_path / "uid.key"
    key.write_bytes(KEY)
    config = tmp_path / "destinations.yaml"
    url = orthanc.dicomweb_url
    config.write_text(
        "destinations:\n"
        f"  - {{name: clinical, kind: dicomweb, url: '{url}', auth: none}}\n"
        f"  - {{name: research, kind: dicomweb, url: '{url}', auth: none,\n"
        f"     redact: {{keep: [PatientAge, Modality], uid_key_file: '{key}'}},\n"
        f"     transcode: {JPEG2000Lossless}}}\n"
        f"  - {{name: teaching, kind: dicomweb, url: '{url}', auth: none,\n"
        f"     redact: {{profile: CHC_BASIC, uid_key_file: '{tmp_path / 'missing.key'}'}}}}\n"
    )
    db = sqlite_url(tmp_path)
    engine = make_engine(db)
    upgrade_to_head(engine)
    engine.dispose()
    result = check(tmp_path, db, "--destinations", str(config))
    found: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        found.setdefault(line[5:].split(":", 1)[0], []).append(line)
    assert "clinical/redaction" not in found  # originals: nothing to check
    warn, ok = found["research/redaction"]
    assert warn.startswith("WARN") and "leaves out SpecificCharacterSet" in warn
    assert ok.startswith("ok") and "redact keep_list (uid keyed), transcode 1.2.840" in ok
    (fail,) = found["teaching/redaction"]
    assert fail.startswith("FAIL") and "missing.key" in fail and "/dev/urandom" in fail
    assert result.returncode == 1
