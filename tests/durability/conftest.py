"""Fixtures of the durability suite, and a summary of every scenario's invariant counts."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from stowaway.db.engine import make_engine
from stowaway.db.migrate import upgrade_to_head
from tests.durability.harness import InvariantViolation, Ledger, Scenario, ScenarioFactory
from tests.support.databases import sqlite_url
from tests.support.healthcare_stub import HealthcareStub


@pytest.fixture(autouse=True)
def quiet_pynetdicom() -> Iterator[None]:
    """Refused connections while a receiver is down are expected here; pynetdicom
    would log each one as an error with a traceback."""
    logger = logging.getLogger("pynetdicom")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


@pytest.fixture
def stub() -> Iterator[HealthcareStub]:
    with HealthcareStub() as s:
        yield s


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def scenario(ledger: Ledger, tmp_path: Path, record_property: object) -> ScenarioFactory:
    """Makes the test's :class:`Scenario`: ``scenario(name, db_url)``; its spool is the
    ``stowaway`` fixture's (``tmp_path/data/spool``) unless ``spool_dir`` says otherwise."""

    def make(
        name: str, db_url: str, *, seed: int | None = None, spool_dir: Path | None = None
    ) -> Scenario:
        return Scenario(
            name,
            ledger,
            record_property,  # type: ignore[arg-type]
            db_url=db_url,
            spool_dir=spool_dir or tmp_path / "data" / "spool",
            seed=seed,
        )

    return make


@pytest.fixture
def sqlite_db_url(tmp_path: Path) -> str:
    """A migrated SQLite queue, for scenarios where the database does not matter."""
    url = sqlite_url(tmp_path)
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    return url


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Timing trouble may be re-run (pyproject's --reruns), a broken invariant never:
    a lost instance that passes on the second try is still a lost instance."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):
            item.add_marker(
                pytest.mark.flaky(reruns=2, reruns_delay=2, rerun_except=InvariantViolation)
            )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line per scenario with its invariant counts (also under xdist)."""
    lines = []
    for kind in ("passed", "failed"):
        for report in terminalreporter.stats.get(kind, []):
            for name, value in getattr(report, "user_properties", []):
                if name == "durability" and isinstance(value, dict):
                    lines.append((report.nodeid, kind, value))
    if not lines:
        return
    terminalreporter.section("durability invariant")
    for nodeid, kind, v in sorted(lines, key=lambda item: str(item[0])):
        terminalreporter.write_line(
            f"{kind:6} {nodeid.split('::')[-1]}: acknowledged={v['acknowledged']} "
            f"in_destination={v['in_destination']} waiting_failed={v['waiting_failed']} "
            f"waiting_pending={v['waiting_pending']} lost={v['lost']} "
            f"(sent={v['sent']}, seed={v['seed']})"
        )
