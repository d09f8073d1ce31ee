"""The HTTP API (/api/v1) of a real `stowaway receive`, on SQLite and Postgres.

Every endpoint answers what `stowaway queue ... --json` prints for the same selectors;
pages put together are the whole listing; actions need the right token and are logged
with its name; the OpenAPI document is generated and Schemathesis, run against it,
finds no 5xx.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
import requests
from sqlalchemy import update

from stowaway.db.engine import make_engine
from stowaway.db.models import DestinationState, Instance, Status, utcnow
from stowaway.db.queue import NewInstance, Queue
from tests.conftest import StowawayFactory
from tests.support.dicom_files import make_study
from tests.support.processes import StowawayProcess, wait_for_port
from tests.support.seeding import seed_queue, wait_until

pytestmark = pytest.mark.timeout(300)

LEASE = timedelta(minutes=5)
TOKEN = "s3cret-token-for-the-api-0123456789"
ERROR_403 = (
    "the service account lacks roles/healthcare.dicomEditor on the DICOM store: grant it "
    "[Http_403, PERMISSION_DENIED, Permission 'healthcare.dicomStores.d]"
)
URL = (
    "https://healthcare.googleapis.com/v1/projects/p/locations/l/datasets/d/dicomStores/s/dicomWeb"
)


class Api:
    """The API of one process, over loopback."""

    def __init__(self, proc: StowawayProcess) -> None:
        self.proc = proc
        self.base = f"http://127.0.0.1:{proc.http_port}/api/v1/"
        self.http = requests.Session()
        self.http.trust_env = False  # never a proxy for loopback

    def get(self, path: str, **params: Any) -> Any:
        response = self.http.get(self.base + path, params=params, timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def post(self, path: str, body: Any, token: str | None = TOKEN) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return self.http.post(self.base + path, json=body, headers=headers, timeout=60)

    def act(self, action: str, body: Any) -> Any:
        response = self.post(f"actions/{action}", body)
        assert response.status_code == 200, response.text
        return response.json()

    def cli(self, *args: str) -> Any:
        return json.loads(self.proc.cli("queue", *args, "--json", check=False).stdout)


@pytest.fixture
def q(db_url: str) -> Iterator[Queue]:
    engine = make_engine(db_url)
    yield Queue(engine)
    engine.dispose()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "admin-tokens"
    path.write_text(f"# operators\nalice:{TOKEN}\n\nbob:another-token-of-bob-000000\n")
    return path


def seed(tmp_path: Path, db_url: str, n: int, seed_value: int) -> list[int]:
    files = make_study(tmp_path / f"study-{seed_value}", n, rows=16, cols=16, seed=seed_value)
    return seed_queue(db_url, tmp_path / "data", files)


def fail_rows(q: Queue, ids: list[int], error: str = ERROR_403) -> None:
    """Claim every due row and fail those in ``ids`` (the rest go back untouched)."""
    claimed = []  # a claim takes one study's rows: claim until nothing is due
    while batch := q.claim_batch("api-test", 10_000, LEASE):
        claimed.extend(batch)
    for row in claimed:
        if row.id in ids:
            q.fail(row.id, "api-test", error)
        else:
            q.release(row.id, "api-test")


def receive(stowaway: StowawayFactory, *args: str) -> StowawayProcess:
    """``stowaway receive``, given time to start on a busy machine (its DICOM port opens
    once the HTTP server answers)."""
    proc = stowaway("receive", *args, wait_port=False)
    assert proc.proc is not None
    wait_for_port(proc.port, timeout=120, proc=proc.proc)
    return proc


def too_large(port: int, path: str) -> bytes:
    """The answer to a request that announces a body over the limit (never sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {TOKEN}\r\nContent-Length: 70000\r\n\r\n".encode()
        )
        return sock.recv(200)


def without_age(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "oldest_pending_age_seconds"}


def test_every_read_endpoint_answers_what_the_cli_prints(
    stowaway: StowawayFactory, tmp_path: Path, db_url: str, q: Queue
) -> None:
    old = seed(tmp_path, db_url, 3, seed_value=1)
    new = seed(tmp_path, db_url, 4, seed_value=2)
    with q.engine.begin() as conn:
        conn.execute(
            update(Instance)
            .where(Instance.id.in_(old))
            .values(received_at=utcnow() - timedelta(days=3))
        )
    fail_rows(q, [old[0], new[0]])
    q.set_destination("default", DestinationState.BLOCKED, ERROR_403, utcnow(), URL)
    api = Api(receive(stowaway))
    study_new = q.get(new[0]).study_instance_uid  # type: ignore[union-attr]

    summary = api.get("summary")
    stats = api.cli("stats")
    assert without_age(summary) == without_age(
        {**stats, "destinations": [{**d, "fix": ERROR_403} for d in stats["destinations"]]}
    )
    assert summary["failed"] == 2 and summary["pending"] == 5
    [blocked] = api.get("destinations")
    assert blocked["state"] == "blocked" and blocked["reason"] == ERROR_403
    assert blocked["fix"] == ERROR_403  # what `check` prints for a 403: the cause and the fix
    assert api.get("destinations/default") == blocked
    assert api.http.get(api.base + "destinations/nowhere", timeout=10).status_code == 404

    # (Each CLI run is a Python start-up: a few cover every filter.)
    for filters in (
        {"status": "failed"},
        {"destination": "elsewhere"},
        {"study": study_new, "destination": "default"},
        {"since": "2h", "status": "pending"},
    ):
        flags = [x for key, value in filters.items() for x in (f"--{key}", value)]
        page = api.get("instances", **filters)
        assert page["items"] == api.cli("ls", *flags), filters
        assert page["next_cursor"] is None
    assert [r["id"] for r in api.get("instances", since="1d")["items"]] == new

    # Pages of 2, put together, are the whole listing, in order.
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = api.get("instances", limit=2, **({"cursor": cursor} if cursor else {}))
        seen.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page["items"]) == 2
    assert seen == api.cli("ls")
    assert len(seen) == 7

    detail = api.get(f"instances/{old[0]}")
    assert detail == api.cli("show", str(old[0]))
    assert detail["spool_file"]["intact"] is True
    assert [e["kind"] for e in detail["events"]] == ["failed"]
    by_sop = api.get("instances", sop=detail["sop_instance_uid"])["items"]
    assert [r["id"] for r in by_sop] == [
        d["id"] for d in api.cli("show", detail["sop_instance_uid"])
    ]
    missing = api.http.get(api.base + "instances/999999", timeout=10)
    assert missing.status_code == 404 and missing.json() == {
        "detail": "no queue row with id 999999"
    }
    for bad in (
        {"status": "lost"},
        {"limit": "0"},
        {"limit": "501"},
        {"since": "yesterday"},
        {"cursor": "x"},
        {"study": "a b"},
    ):
        response = api.http.get(api.base + "instances", params=bad, timeout=10)
        assert response.status_code == 422, (bad, response.text)
    info = api.get("server")
    assert info["actions_enabled"] is False and info["api"] == "v1"


def test_actions_need_a_token_of_the_file_and_are_logged_with_its_name(
    stowaway: StowawayFactory, tmp_path: Path, db_url: str, q: Queue, token_file: Path
) -> None:
    ids = seed(tmp_path, db_url, 3, seed_value=3)
    fail_rows(q, ids)
    proc = receive(stowaway, "--admin-token-file", str(token_file))
    api = Api(proc)
    assert api.get("server")["actions_enabled"] is True
    url = api.base + "actions/requeue"
    body = {"ids": [ids[0]]}

    missing = api.http.post(url, json=body, timeout=30)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="stowaway"'
    for header in ("Basic YWxpY2U6eA==", "Bearer", "Bearer two words", TOKEN):
        malformed = api.http.post(url, json=body, headers={"Authorization": header}, timeout=30)
        assert malformed.status_code == 401, header
        assert "invalid_request" in malformed.headers["WWW-Authenticate"]
    wrong = api.post("actions/requeue", body, token=TOKEN + "x")
    assert wrong.status_code == 403
    assert wrong.json() == {"detail": "this token is not in --admin-token-file"}
    assert [r.status for r in q.rows()] == [Status.FAILED] * 3  # nothing was done

    done = api.act("requeue", body)
    assert done == {"requeued": 1, "superseded": [], "leased": [], "file_gone": [], "not_found": []}
    assert q.get(ids[0]).status == Status.PENDING  # type: ignore[union-attr]
    # Cookies are never read: a browser's cookie cannot act for anyone.
    cookie = api.http.post(url, json=body, cookies={"Authorization": TOKEN}, timeout=30)
    assert cookie.status_code == 401
    assert "access-control-allow-origin" not in {h.lower() for h in cookie.headers}

    # Another name's token works too, and the log says who did what, never the token.
    bob = api.post("actions/purge", {"ids": [ids[1]]}, token="another-token-of-bob-000000")
    assert bob.status_code == 200 and bob.json()["purged"] == 1
    wait_until(lambda: "action=purge" in proc.log(), timeout=10)
    lines = [line for line in proc.log().splitlines() if "api_action " in line]
    assert len(lines) == 2
    assert "who=alice" in lines[0] and "action=requeue" in lines[0] and "requeued=1" in lines[0]
    assert "who=bob" in lines[1] and "action=purge" in lines[1] and "purged=1" in lines[1]
    assert TOKEN not in proc.log() and "another-token-of-bob" not in proc.log()
    refused = [line for line in proc.log().splitlines() if "api_action_refused" in line]
    assert len(refused) == 7  # 1 missing, 4 malformed, 1 wrong, 1 with a cookie only

    # A rotated file is read again: alice's old token stops working at once.
    token_file.write_text("carol:the-token-of-carol-0000000\n")
    assert api.post("actions/requeue", {"failed": True}).status_code == 403
    carol = api.post("actions/requeue", {"failed": True}, token="the-token-of-carol-0000000")
    assert carol.status_code == 200 and carol.json()["requeued"] == 1

    # Bounded bodies and lists.
    assert too_large(proc.http_port, "/api/v1/actions/requeue").startswith(b"HTTP/1.1 413 ")
    many = api.post(
        "actions/requeue", {"ids": list(range(1, 1002))}, token="the-token-of-carol-0000000"
    )
    assert many.status_code == 422


def test_actions_are_refused_when_no_token_file_is_given(
    stowaway: StowawayFactory, tmp_path: Path, db_url: str, q: Queue
) -> None:
    ids = seed(tmp_path, db_url, 1, seed_value=4)
    fail_rows(q, ids)
    api = Api(receive(stowaway))
    for action, body in (
        ("requeue", {"failed": True}),
        ("purge", {"failed": True}),
        ("reroute", {}),
    ):
        for token in (None, TOKEN):
            response = api.post(f"actions/{action}", body, token=token)
            assert response.status_code == 403, (action, token)
            assert "read-only" in response.json()["detail"]
    assert api.http.get(api.base + "actions/requeue", timeout=10).status_code == 405
    assert q.get(ids[0]).status == Status.FAILED  # type: ignore[union-attr]
    assert api.get("summary")["failed"] == 1  # reading needs no token


def test_a_token_file_variable_naming_no_file_starts_read_only_and_says_so(
    stowaway: StowawayFactory, tmp_path: Path
) -> None:
    """Kubernetes' optional Secret not created: the pod runs, read-only, with one log
    line; once the file is there, a restart enables the actions."""
    mounted = tmp_path / "admin" / "tokens"
    env = {"STOWAWAY_ADMIN_TOKEN_FILE": str(mounted)}

    def start() -> StowawayProcess:
        proc = stowaway("receive", env=env, wait_port=False)
        assert proc.proc is not None
        wait_for_port(proc.port, timeout=120, proc=proc.proc)
        return proc

    proc = start()
    api = Api(proc)
    assert api.get("server")["actions_enabled"] is False
    response = api.post("actions/requeue", {"failed": True})
    assert response.status_code == 403 and "read-only" in response.json()["detail"]
    (line,) = [entry for entry in proc.log().splitlines() if "admin_token_file_absent" in entry]
    assert str(mounted) in line and "read-only" in line
    assert proc.stop() == 0

    mounted.parent.mkdir()
    mounted.write_text(f"alice:{TOKEN}\n")
    api = Api(start())
    assert api.get("server")["actions_enabled"] is True
    assert api.act("requeue", {"failed": True})["requeued"] == 0
    assert "admin_token_file_absent" not in api.proc.log()


def test_requeue_and_purge_do_what_the_cli_does_with_the_same_selectors(
    stowaway: StowawayFactory, tmp_path: Path, db_url: str, q: Queue, token_file: Path
) -> None:
    study_a = seed(tmp_path, db_url, 3, seed_value=5)
    study_b = seed(tmp_path, db_url, 2, seed_value=6)
    api = Api(receive(stowaway, "--admin-token-file", str(token_file)))
    uid_b = q.get(study_b[0]).study_instance_uid  # type: ignore[union-attr]

    for selectors, flags in (
        ({"status": "failed", "study": uid_b}, ("--status", "failed", "--study", uid_b)),
        ({"failed": True, "destination": "default"}, ("--failed", "--destination", "default")),
        ({"ids": [study_a[0], 999_999]}, (str(study_a[0]), "999999")),
        ({"failed": True, "destination": "elsewhere"}, ("--failed", "--destination", "elsewhere")),
    ):
        fail_rows(q, study_a + study_b)
        by_api = api.act("requeue", selectors)
        after_api = [(r.id, r.status) for r in q.rows()]
        fail_rows(q, study_a + study_b)
        by_cli = api.cli("requeue", *flags)
        assert by_api == by_cli, selectors
        assert [(r.id, r.status) for r in q.rows()] == after_api
    fail_rows(q, study_a + study_b)

    # Selectors that make no sense: the CLI's rules, in the API's words.
    for selectors, message in (
        ({"ids": [1], "failed": True}, "give row IDs or failed, not both"),
        ({"failed": True, "status": "failed"}, "failed and status cannot be combined"),
        ({}, "say which rows: row IDs, or failed / status"),
        ({"ids": [1], "study": uid_b}, "study selects rows together with failed or status"),
    ):
        response = api.post("actions/requeue", selectors)
        assert response.status_code == 422, selectors
        assert message in response.json()["detail"][0]["msg"]
    assert api.post("actions/requeue", {"failed": True, "colour": "red"}).status_code == 422
    assert api.post("actions/purge", {"failed": True, "older_than": "7"}).status_code == 422

    preview = api.act("purge", {"ids": study_a, "dry_run": True})
    assert preview["dry_run"] is True and preview["purged"] == 0
    assert preview["would_purge"] == study_a and preview["bytes"] == q.total_bytes(study_a)
    assert len(q.rows()) == 5
    by_api = api.act("purge", {"ids": [*study_a, 999_999]})
    by_cli = api.cli("purge", *map(str, study_b), "999998", "--yes")
    assert by_api["purged"] == 3 and by_cli["purged"] == 2
    assert by_api["not_found"] == [999_999] and by_cli["not_found"] == [999_998]
    assert set(by_api) == {*by_cli, "dry_run", "would_purge"}
    assert by_api["files_removed"] == 3 and by_api["file_errors"] == [] and by_api["skipped"] == []
    assert q.rows() == []
    assert not list((tmp_path / "data" / "spool").glob("[0-9]*/*/*/*/*.dcm"))


def test_reroute_routes_unrouted_rows_like_the_cli(
    stowaway: StowawayFactory, tmp_path: Path, db_url: str, q: Queue, token_file: Path
) -> None:
    ids = seed(tmp_path, db_url, 2, seed_value=7)
    with q.engine.begin() as conn:  # as if no rule had matched when they arrived
        conn.execute(
            update(Instance)
            .where(Instance.id.in_(ids))
            .values(status=Status.UNROUTED, destination="")
        )
    routes = tmp_path / "destinations.yaml"
    routes.write_text(
        "destinations:\n  - {name: pacs, kind: dicomweb, url: 'http://127.0.0.1:9/dicom-web'}\n"
        "default: pacs\n"
    )
    api = Api(
        receive(stowaway, "--admin-token-file", str(token_file), "--destinations", str(routes))
    )
    dry = api.act("reroute", {"dry_run": True})
    assert dry == api.cli("reroute", "--destinations", str(routes), "--dry-run")
    assert dry["rows"] == [{"id": i, "destinations": ["pacs"]} for i in ids]
    done = api.act("reroute", {"ids": [ids[0], 999_999]})
    assert done["not_found"] == [999_999] and done["dry_run"] is False
    [row] = done["rows"]
    assert row["id"] == ids[0] and row["destinations"] == ["pacs"] and len(row["created"]) == 1
    assert q.get(row["created"][0]).status == Status.PENDING  # type: ignore[union-attr]
    assert api.get("summary")["unrouted"] == 1


def test_reroute_needs_routing_in_the_process(stowaway: StowawayFactory, token_file: Path) -> None:
    api = Api(receive(stowaway, "--admin-token-file", str(token_file)))
    response = api.post("actions/reroute", {})
    assert response.status_code == 409 and "no destinations" in response.json()["detail"]


def test_probes_keep_their_answers_beside_the_api(stowaway: StowawayFactory) -> None:
    proc = receive(stowaway)
    http = Api(proc).http
    root = f"http://127.0.0.1:{proc.http_port}"
    healthz = http.get(root + "/healthz", timeout=10)
    assert (healthz.status_code, healthz.text) == (200, "ok\n")
    assert healthz.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert healthz.headers["Cache-Control"] == "no-store"
    readyz = http.get(root + "/readyz", timeout=10)
    assert readyz.status_code == 200 and readyz.headers["Content-Type"] == "application/json"
    assert readyz.json()["ready"] is True
    metrics = http.get(root + "/metrics", timeout=10)
    assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert http.get(root + "/nothing", timeout=10).status_code == 404
    console = http.get(root + "/", timeout=10)
    assert console.status_code == 200 and "console/console.js" in console.text
    assert "script-src 'self'" in console.headers["Content-Security-Policy"]
    for asset in ("console/console.js", "console/console.css"):
        assert http.get(f"{root}/{asset}", timeout=10).status_code == 200
    schema = http.get(root + "/api/v1/openapi.json", timeout=10).json()
    assert schema["openapi"].startswith("3.")
    paths = set(schema["paths"])
    assert {
        "/api/v1/summary",
        "/api/v1/instances",
        "/api/v1/instances/{row_id}",
        "/api/v1/actions/requeue",
        "/api/v1/actions/purge",
        "/api/v1/actions/reroute",
        "/api/v1/destinations",
        "/api/v1/destinations/{name}",
        "/api/v1/server",
    } <= paths
    assert "/healthz" not in paths
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_schemathesis_finds_no_server_error(
    stowaway: StowawayFactory, tmp_path: Path, db_url: str, q: Queue, token_file: Path
) -> None:
    """Generated requests (valid and not) against the generated OpenAPI document, with the
    right token so that the actions run too: never a 5xx. Bounded: 5 examples an
    operation and phase, at most 45 s."""
    ids = seed(tmp_path, db_url, 4, seed_value=8)
    fail_rows(q, ids[:2])
    q.enqueue(
        NewInstance(
            "1.2.3.4",
            "1.2.840.10008.5.1.4.1.1.7",
            "1.2.3",
            "1.2.3.1",
            "1.2.840.10008.1.2.1",
            "SEED",
            "127.0.0.1:0",
            "missing.dcm",
            1,
            "0" * 64,
            destinations=(),
        )
    )
    proc = receive(stowaway, "--admin-token-file", str(token_file))
    binary = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    report = tmp_path / "schemathesis"
    run = subprocess.run(
        [
            binary,
            "run",
            f"http://127.0.0.1:{proc.http_port}/api/v1/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "5",
            "--max-time",
            "45",
            "--seed",
            "19",
            "--workers",
            "1",
            "--request-timeout",
            "20",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--generation-database",
            "none",
            "--report",
            "junit",
            "--report-dir",
            str(report),
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SCHEMATHESIS_TELEMETRY": "false"},
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "http_endpoint_error" not in proc.log()
    [junit] = report.glob("junit-*.xml")
    suite = ElementTree.parse(junit).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("failures"), suite.get("errors")) == ("0", "0")
    tested = {case.get("name") for case in suite.iter("testcase")}
    assert {"POST /api/v1/actions/requeue", "GET /api/v1/instances"} <= tested
