"""docker-compose.yml's own stack, run as local processes (there is no Docker here).

The services are started in the order their ``depends_on`` conditions give, each
stowaway service with the command and environment written in the compose file
(plus the image's ENV), then an instance goes end to end: DCMTK -> receiver ->
shared spool and Postgres queue -> forwarder -> Orthanc.

What a container would have that a process has not is mapped, and only that:

* service host names (``postgres``, ``orthanc``) -> the loopback address and
  port of the local stand-ins: a fresh Postgres database and the test Orthanc;
* each named volume -> a directory under ``tmp_path``, mounted at its
  container path by rewriting ``STOWAWAY_DATA_DIR``;
* container ports (2575, 8080, the same in every container) -> free loopback
  ports, through ``STOWAWAY_PORT`` / ``STOWAWAY_HTTP_PORT`` / ``*_HOST``;
* the stowaway services' compose health checks run as they are, with the port
  rewritten.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from sqlalchemy.engine import make_url

from tests.support.databases import postgres_database
from tests.support.dicom_files import make_study, read_uids
from tests.support.orthanc import OrthancServer
from tests.support.processes import StowawayProcess, dcmsend, free_port, run_cli
from tests.support.seeding import wait_until

pytestmark = [pytest.mark.timeout(240), pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
EXTERNAL = {"postgres", "orthanc"}  # stand-ins: the fresh database and the Orthanc fixture


def load_compose() -> dict[str, Any]:
    with COMPOSE.open() as f:
        doc = yaml.safe_load(f)  # resolves the x-stowaway anchor and << merges
    assert isinstance(doc, dict)
    return doc


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def image_env() -> dict[str, str]:
    """The STOWAWAY_* ENV defaults baked into the image."""
    env: dict[str, str] = {}
    text = DOCKERFILE.read_text()
    for m in re.finditer(r"^ENV\s+((?:.*\\\n)*.*)$", text, re.MULTILINE):
        for pair in shlex.split(m.group(1).replace("\\\n", " ")):
            key, _, value = pair.partition("=")
            if key.startswith("STOWAWAY_"):
                env[key] = value
    return env


def start_order(services: dict[str, dict[str, Any]]) -> list[str]:
    """Services in an order that satisfies every depends_on (compose's own start order)."""
    order: list[str] = []
    while len(order) < len(services):
        ready = [
            name
            for name, svc in services.items()
            if name not in order and set(svc.get("depends_on", {})) <= set(order)
        ]
        assert ready, f"depends_on cycle among {set(services) - set(order)}"
        order += sorted(ready)
    return order


def http_get(url: str) -> requests.Response:
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, timeout=10)


class LocalStack:
    """Runs the compose services as processes; see the module docstring for the mapping."""

    def __init__(self, compose: dict[str, Any], tmp: Path, pg_url: str, orthanc: OrthancServer):
        self.compose = compose
        self.services: dict[str, dict[str, Any]] = dict(compose["services"])
        self.tmp = tmp
        self.pg_url = pg_url
        self.orthanc = orthanc
        self.procs: dict[str, StowawayProcess] = {}
        self.jobs: dict[str, subprocess.CompletedProcess[str]] = {}
        self.envs: dict[str, dict[str, str]] = {}
        self.http_ports: dict[str, int] = {}
        self.dicom_ports: dict[str, int] = {}

    def rewrite(self, value: str) -> str:
        """Map compose service addresses to the local stand-ins."""
        pg = self.services["postgres"]
        if value.startswith("postgresql"):
            url = make_url(value)
            assert url.host == "postgres", value
            pg_env = environment(pg)
            assert url.database == pg_env["POSTGRES_DB"]
            assert (url.username, url.password) == (
                pg_env["POSTGRES_USER"],
                pg_env["POSTGRES_PASSWORD"],
            )
            return self.pg_url  # the same role for a fresh database of ours
        value = value.replace("//orthanc:8042/", f"//127.0.0.1:{self.orthanc.http_port}/")
        assert "//orthanc" not in value and "//postgres" not in value, value
        return value

    def env_for(self, name: str) -> dict[str, str]:
        svc = self.services[name]
        env = {**image_env(), **environment(svc)}
        env = {k: self.rewrite(v) for k, v in env.items()}
        data_dir = env.get("STOWAWAY_DATA_DIR", "stowaway-data")
        mounted = None
        for volume in svc.get("volumes", []):
            source, target = str(volume).split(":")[:2]
            if target == data_dir:
                mounted = self.tmp / "volumes" / source
        # A service without the volume has its own container filesystem.
        env["STOWAWAY_DATA_DIR"] = str(mounted or self.tmp / "containers" / name / "data")
        self.http_ports[name] = free_port()
        env["STOWAWAY_HTTP_PORT"] = str(self.http_ports[name])
        env["STOWAWAY_HTTP_HOST"] = "127.0.0.1"
        if "STOWAWAY_PORT" in env:
            self.dicom_ports[name] = free_port()
            env["STOWAWAY_PORT"] = str(self.dicom_ports[name])
            env["STOWAWAY_HOST"] = "127.0.0.1"
        self.envs[name] = env
        return env

    def wait_condition(self, dependency: str, condition: str) -> None:
        if dependency in EXTERNAL:
            assert condition == "service_healthy", (dependency, condition)
            return  # the fixtures only exist once healthy
        if condition == "service_completed_successfully":
            assert self.jobs[dependency].returncode == 0
        elif condition == "service_healthy":
            wait_until(lambda: self.healthy(dependency), timeout=30)
        else:
            assert condition == "service_started", condition

    def healthy(self, name: str) -> bool:
        """Run the service's compose health check with its port mapped."""
        check = self.services[name]["healthcheck"]["test"]
        assert check[0] == "CMD", check
        args = [a.replace(":8080/", f":{self.http_ports[name]}/") for a in check[1:]]
        if args[0] == "python":
            args[0] = sys.executable
        result = subprocess.run(args, capture_output=True, timeout=15)
        return result.returncode == 0

    def up(self) -> None:
        for name in start_order(self.services):
            if name in EXTERNAL:
                continue
            svc = self.services[name]
            for dependency, spec in svc.get("depends_on", {}).items():
                self.wait_condition(dependency, spec["condition"])
            assert svc.get("build") == ".", name  # a stowaway image service
            env = self.env_for(name)
            args = [self.rewrite(a) for a in command(svc)]
            if svc.get("restart") == "no":  # a one-shot job
                result = run_cli(*args, env=env, check=False)
                assert result.returncode == 0, f"{name}: {result.stdout}\n{result.stderr}"
                self.jobs[name] = result
                continue
            data_dir = Path(env["STOWAWAY_DATA_DIR"])
            proc = StowawayProcess(
                args,
                data_dir,
                env.get("STOWAWAY_DB_URL", ""),
                self.dicom_ports.get(name, 0),
                self.http_ports[name],
                self.tmp / f"{name}.log",
                env,
            )
            self.procs[name] = proc.start(wait_port=name in self.dicom_ports)
            # compose would not start a dependant before this check passes
            wait_until(lambda n=name: self.healthy(n), timeout=30)  # type: ignore[misc]

    def down(self) -> dict[str, int]:
        """SIGTERM every long-running service (dependants first); their exit codes."""
        codes = {}
        for name, proc in reversed(list(self.procs.items())):
            if proc.proc is not None and proc.proc.returncode is None:
                codes[name] = proc.stop()
        return codes


@pytest.fixture
def stack(tmp_path: Path, orthanc: OrthancServer) -> Iterator[LocalStack]:
    with postgres_database() as pg_url:
        local = LocalStack(load_compose(), tmp_path, pg_url, orthanc)
        try:
            yield local
        finally:
            local.down()


def json_log(path: Path) -> list[dict[str, Any]]:
    """Every line must be one JSON object (compose runs with --log-format json)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


FORWARDED = 'stowaway_instances_forwarded_total{destination="default"}'


def metric(port: int, name: str) -> float:
    text = http_get(f"http://127.0.0.1:{port}/metrics").text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else float("nan")


def test_compose_stack_as_local_processes_delivers_end_to_end(
    stack: LocalStack, orthanc: OrthancServer, tmp_path: Path
) -> None:
    started = time.monotonic()
    stack.up()
    receiver, forwarder = stack.procs["receiver"], stack.procs["forwarder"]
    # receiver and forwarder share the spool volume, as in the compose file
    assert receiver.data_dir == forwarder.data_dir == tmp_path / "volumes" / "spool"
    assert stack.jobs["migrate"].returncode == 0

    # The README's line: dcmsend to the receiver's DICOM port (2575 in compose).
    files = make_study(tmp_path / "study", 2, rows=64, cols=64, seed=61)
    sent = dcmsend(receiver.port, files, "IMPORTADAPTER")
    assert sent.returncode == 0, sent.stderr
    orthanc.wait_for_count(2, timeout=60)
    uids = {read_uids(f).sop_uid for f in files}
    assert orthanc.instance_uids() == uids
    elapsed = time.monotonic() - started

    wait_until(lambda: metric(stack.http_ports["forwarder"], FORWARDED) == 2, 10)
    assert (
        metric(stack.http_ports["receiver"], 'stowaway_instances_received_total{status="success"}')
        == 2
    )
    for name in ("receiver", "forwarder"):
        r = http_get(f"http://127.0.0.1:{stack.http_ports[name]}/readyz")
        assert r.status_code == 200, (name, r.text)

    rows = json.loads(run_cli("queue", "ls", "--json", env=stack.envs["receiver"]).stdout)
    assert {r["status"] for r in rows} == {"done"} and len(rows) == 2
    assert {r["node_id"] for r in rows} == {"compose"}

    assert stack.down() == {"receiver": 0, "forwarder": 0}
    # compose logs JSON: one object per line, with the instance's fields.
    stored = [e for e in json_log(tmp_path / "receiver.log") if e["event"] == "instance_stored"]
    assert {e["sop_instance_uid"] for e in stored} == uids
    assert all(e["severity"] == "INFO" and isinstance(e["row_id"], int) for e in stored)
    forwarded = [
        e for e in json_log(tmp_path / "forwarder.log") if e["event"] == "instance_forwarded"
    ]
    assert {e["sop_instance_uid"] for e in forwarded} == uids
    assert {e["row_id"] for e in forwarded} == {r["id"] for r in rows}
    assert all(e["outcome"] == "success" and e["attempt"] == 1 for e in forwarded)
    print(f"compose stack up and one study delivered in {elapsed:.1f} s")
