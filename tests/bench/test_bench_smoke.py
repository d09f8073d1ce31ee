"""The benchmark harness runs end to end on tiny data, so it cannot rot.

No timing is asserted: the machine running the tests is busy with other tests.
What is checked is that every case ran against real components (DCMTK,
pynetdicom, Orthanc, SQLite and Postgres) and produced its rows, ratios, plans
and targets in the JSON file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.databases import PG_URL
from tests.support.orthanc import orthanc_available

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.postgres
@pytest.mark.timeout(400)
def test_bench_quick_run_produces_every_case(tmp_path: Path) -> None:
    if not orthanc_available():
        pytest.skip("Orthanc not installed: apt-get install orthanc orthanc-dicomweb")
    out = tmp_path / "results.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--repeat",
            "1",
            "--ct",
            "4",
            "--small",
            "8",
            "--huge-mib",
            "4",
            "--claim-rows",
            "2000",
            "--out",
            str(out),
            "--workdir",
            str(tmp_path / "work"),
            "--data-dir",
            str(tmp_path / "data"),
            "--pg-url",
            PG_URL,
            "--timeout",
            "120",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {row["key"]: row for row in report["rows"]}
    for row in rows.values():
        assert len(row["seconds"]) == 1, row["key"]
        assert row["instances_per_second"] > 0, row["key"]
    systems = {(row["case"], row["system"]) for row in report["rows"]}
    for case, system in [
        ("ingest", "stowaway receive"),
        ("ingest", "bare pynetdicom"),
        ("ingest", "storescp"),
        ("ingest", "storescp TCP_NODELAY=1"),
        ("forward", "stowaway forward"),
        ("forward", "POST loop, best batch"),
        ("e2e", "stowaway serve, sender's view"),
        ("memory", "stowaway receive"),
        ("memory", "stowaway forward"),
        ("cores", "stowaway receive --processes 1"),
        ("cores", "storescp --fork, TCP_NODELAY=1 both ends"),
        ("uplink", "stowaway forward, best swept"),
        ("uplink", "Google-style: 1 instance per request, 1 at a time"),
    ]:
        assert (case, system) in systems, (case, system)
    # The uplink case went through the link emulator, with the defaults compared to
    # the sweep's best, and measured the 429 storm.
    uplink = [r for r in report["rows"] if r["case"] == "uplink"]
    assert any("datacenter" in r["data"] and r["ratio"] for r in uplink)
    assert any("429" in r["data"] and r["extra"]["requests_during_storm"] for r in uplink)
    assert any(t["name"].startswith("uplink 429 storm") for t in report["targets"])
    # Every compared row has its ratio to a baseline measured in the same run.
    ours = rows["ingest/ct-4, 1 sender/stowaway receive"]
    assert ours["baseline"] == "ingest/ct-4, 1 sender/bare pynetdicom"
    assert ours["ratio"] > 0
    assert ours["max_peak_rss_mb"] > 0
    # The claim ran on both databases and its plans use the claim indexes.
    claims = {c["database"]: c for c in report["claim"]}
    assert set(claims) == {"SQLite", "Postgres"}
    for claim in claims.values():
        assert claim["rows"] == 2000 and claim["claims"] > 0
        shown = "\n".join(claim["plans"].values())  # per branch, or the single statement
        assert "ix_instances_due" in shown and "ix_instances_lease" in shown
    assert report["targets"]
    # The same table is printed.
    assert "| ingest | ct-4, 1 sender | stowaway receive" in done.stdout
