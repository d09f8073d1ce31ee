"""Shared fixtures: queue databases, the spool, stowaway processes, Orthanc."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stowaway.db.engine import make_engine
from stowaway.db.migrate import upgrade_to_head
from stowaway.db.queue import Queue
from stowaway.db.spool import Spool
from tests.support.databases import drop_templates, postgres_database, sqlite_url
from tests.support.orthanc import orthanc_fixture, orthanc_server_fixture  # noqa: F401
from tests.support.processes import StowawayProcess, free_port


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak", action="store_true", help="run long seeded soak scenarios")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--soak"):
        return
    skip = pytest.mark.skip(reason="soak run: enable with --soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    with contextlib.suppress(Exception):
        drop_templates()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty queue database: SQLite and Postgres."""
    if request.param == "sqlite":
        url = sqlite_url(tmp_path)
        engine = make_engine(url)
        upgrade_to_head(engine)
        engine.dispose()
        yield url
    else:
        with postgres_database() as url:
            yield url


@pytest.fixture
def queue(db_url: str) -> Iterator[Queue]:
    engine = make_engine(db_url)
    queue = Queue(engine)
    yield queue
    queue.close()
    engine.dispose()


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "spool")
    s.prepare()
    return s


StowawayFactory = Callable[..., StowawayProcess]


@pytest.fixture
def stowaway(tmp_path: Path, db_url: str) -> Iterator[StowawayFactory]:
    """Start ``stowaway <command>`` processes on free loopback ports; stopped after the test."""
    started: list[StowawayProcess] = []

    def start(
        command: str = "receive",
        *extra: str,
        env: dict[str, str] | None = None,
        wait_port: bool | None = None,
        data_dir: Path | None = None,
    ) -> StowawayProcess:
        data = data_dir or tmp_path / "data"
        port, http_port = free_port(), free_port()
        args = [
            command,
            "--data-dir",
            str(data),
            "--db-url",
            db_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(http_port),
            "--min-free-disk",
            "1MiB",
            "--grace-period",
            "5",
            *extra,
        ]
        if command == "forward":
            # forward has no receiver flags
            args = _without(args, ("--host", "--port"))
        proc = StowawayProcess(
            args,
            data,
            db_url,
            port,
            http_port,
            tmp_path / f"stowaway-{len(started)}.log",
            # One receiver process unless a test asks for more (--processes): tests
            # that look at the receiver's own process (its memory, rlimits, threads)
            # would otherwise look at the acceptor.
            {"STOWAWAY_PROCESSES": "1", **(env or {})},
        )
        started.append(proc)
        should_wait = command in ("receive", "serve") if wait_port is None else wait_port
        return proc.start(wait_port=should_wait)

    yield start
    for proc in started:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop()


def _without(args: list[str], flags: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in flags:
            skip = True
            continue
        out.append(arg)
    return out
