"""The spool's dated directories go once they are empty and their hour is long over.

Only empty directories go, only of hours (days, months, years) that ended before
the cutoff, never the fixed ``incoming``/``tmp`` directories or a name outside the
layout; and file removal looks at a gone hour directory once, not per file.
"""

from __future__ import annotations

import io
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from stowaway.db.models import utcnow
from stowaway.db.spool import Spool


def at(spool: Spool, when: datetime) -> str:
    return spool.write(b"", io.BytesIO(b"data"), when).relative_path


def test_empty_hour_directories_before_the_cutoff_go_with_their_emptied_parents(
    spool: Spool,
) -> None:
    old = at(spool, datetime(2025, 3, 31, 23, 10, tzinfo=UTC))
    kept = at(spool, datetime(2025, 4, 1, 5, 0, tzinfo=UTC))  # a failed row's file, say
    spool.remove(old)

    removed = spool.prune_empty_directories(datetime(2025, 6, 1, tzinfo=UTC))

    assert removed == 3  # 2025/03/31/23, 2025/03/31, 2025/03
    assert not (spool.root / "2025" / "03").exists()
    assert spool.absolute(kept).exists()
    assert (spool.root / "2025").is_dir()  # still holds April
    assert spool.incoming_dir.is_dir() and spool.tmp_dir.is_dir()


def test_an_hour_not_over_before_the_cutoff_stays_even_when_empty(spool: Spool) -> None:
    path = at(spool, datetime(2025, 5, 10, 14, 59, tzinfo=UTC))
    spool.remove(path)
    hour = spool.absolute(path).parent

    assert spool.prune_empty_directories(datetime(2025, 5, 10, 14, 30, tzinfo=UTC)) == 0
    assert hour.is_dir()
    assert spool.prune_empty_directories(datetime(2025, 5, 10, 15, 0, tzinfo=UTC)) == 1
    assert not hour.exists() and hour.parent.is_dir()  # the day is not over


def test_names_outside_the_dated_layout_are_left_alone(spool: Spool) -> None:
    (spool.root / "2025" / "13" / "01" / "00").mkdir(parents=True)
    (spool.root / "lost+found").mkdir()
    (spool.root / "2025" / "notes").mkdir()

    assert spool.prune_empty_directories(utcnow() + timedelta(days=1)) == 0
    assert (spool.root / "2025" / "13" / "01" / "00").is_dir()
    assert (spool.root / "lost+found").is_dir()


def test_removal_checks_a_gone_hour_directory_once(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    when = utcnow() - timedelta(days=30)
    paths = [at(spool, when) for _ in range(50)]
    for path in paths:
        spool.remove(path)
    assert spool.prune_empty_directories(utcnow() - timedelta(days=1)) >= 1
    unlinks: list[str] = []
    real = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p: (unlinks.append(str(p)), real(p))[1])

    assert spool.remove_if_present(paths) == 0
    assert unlinks == []

    present = at(spool, utcnow())
    assert spool.remove_if_present([*paths, present]) == 1
    assert not Path(spool.absolute(present)).exists()


def test_a_month_goes_as_soon_as_it_is_over(spool: Spool) -> None:
    spool.remove(at(spool, datetime(2025, 3, 31, 23, 10, tzinfo=UTC)))
    assert spool.prune_empty_directories(datetime(2025, 4, 1, 0, 30, tzinfo=UTC)) == 3
    assert not (spool.root / "2025" / "03").exists()
    assert (spool.root / "2025").is_dir()  # the year is not over
