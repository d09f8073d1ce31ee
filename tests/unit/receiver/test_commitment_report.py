"""The N-EVENT-REPORT's Event Information (PS3.4 Table J.3-2): every item of the request
is in exactly one of the two sequences, failed ones with their Failure Reason."""

from __future__ import annotations

from stowaway.db.commitments import ItemRecord
from stowaway.db.models import ItemResult
from stowaway.receiver.commitment_reporter import report_dataset

CT = "1.2.840.10008.5.1.4.1.1.2"


def item(n: int, result: ItemResult, reason: int | None = None) -> ItemRecord:
    return ItemRecord(n, CT, f"1.2.3.{n}", result, reason, None)


def test_all_committed_has_only_the_referenced_sop_sequence() -> None:
    ds = report_dataset("1.9.1", [item(0, ItemResult.COMMITTED), item(1, ItemResult.COMMITTED)])
    assert ds.TransactionUID == "1.9.1"
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence] == ["1.2.3.0", "1.2.3.1"]
    assert all(i.ReferencedSOPClassUID == CT for i in ds.ReferencedSOPSequence)
    assert "FailedSOPSequence" not in ds


def test_failures_go_in_the_failed_sop_sequence_with_their_reason() -> None:
    ds = report_dataset(
        "1.9.2",
        [item(0, ItemResult.COMMITTED), item(1, ItemResult.FAILED, 0x0112)],
    )
    assert [i.ReferencedSOPInstanceUID for i in ds.ReferencedSOPSequence] == ["1.2.3.0"]
    [failed] = ds.FailedSOPSequence
    assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == ("1.2.3.1", 0x0112)
    only_failures = report_dataset("1.9.3", [item(0, ItemResult.FAILED, 0x0110)])
    assert "ReferencedSOPSequence" not in only_failures
    assert only_failures.FailedSOPSequence[0].FailureReason == 0x0110
