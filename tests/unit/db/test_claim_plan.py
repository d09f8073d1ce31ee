"""The claim's candidate queries are index range scans, not table scans."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from stowaway.db.models import utcnow
from stowaway.db.queue import Queue
from stowaway.db.statements import CLAIM_BRANCHES, claim_candidates, claim_study

INDEX_FOR = {
    "expired_lease": "ix_instances_lease",
    "due": "ix_instances_due",
}


def plan(queue: Queue, branch: str, study: str | None = None) -> str:
    return explain(
        queue, claim_candidates(branch, utcnow() + timedelta(days=1), "", 10, study=study)
    )


def explain(queue: Queue, query: Any) -> str:
    with queue.engine.connect() as conn:
        compiled = query.compile(conn, compile_kwargs={"literal_binds": True})
        if conn.dialect.name == "sqlite":
            rows = conn.execute(text(f"EXPLAIN QUERY PLAN {compiled}")).all()
            return "\n".join(str(r[-1]) for r in rows)
        # A near-empty table would make a sequential scan cheapest: ask whether
        # an index path exists at all.
        conn.execute(text("SET enable_seqscan = off"))
        return "\n".join(r[0] for r in conn.execute(text(f"EXPLAIN {compiled}")).all())


def test_claim_branches_use_their_index(queue: Queue) -> None:
    for branch in CLAIM_BRANCHES:
        shown = plan(queue, branch)
        assert INDEX_FOR[branch] in shown, shown
        # No sort step on either database: the order comes from the index.
        assert "TEMP B-TREE" not in shown.upper(), shown
        assert "Sort" not in shown, shown


def test_claiming_by_study_reads_the_study_index_without_sorting(queue: Queue) -> None:
    study_index = {"expired_lease": "ix_instances_lease", "due": "ix_instances_study_due"}
    for branch in CLAIM_BRANCHES:
        shown = plan(queue, branch, study="1.2.3")
        assert study_index[branch] in shown, shown
        assert "TEMP B-TREE" not in shown.upper(), shown
        assert "Sort" not in shown, shown
    # Which study: one row from the front of each claim index.
    shown = explain(queue, claim_study(utcnow()))
    assert "ix_instances_lease" in shown and "ix_instances_due" in shown, shown
    assert "TEMP B-TREE" not in shown.upper() and "Sort" not in shown, shown


@pytest.mark.parametrize(
    "db_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_postgres_claims_in_one_statement_from_the_same_indexes(queue: Queue) -> None:
    shown = queue.claim_plan(seqscan=False)
    assert "ix_instances_lease" in shown and "ix_instances_due" in shown, shown
    assert "ix_instances_study_due" in shown, shown  # the study's rows, both branches
    assert "ix_instances_sop" in shown, shown  # the superseded-copy check per claimed row
    # Each branch reads its index in order; the only sorts are of the few ids
    # picked (at most twice the batch), after both scans.
    branches = shown[shown.index("CTE anchor") : shown.index("Nested Loop")]
    assert "Sort" not in branches, shown
