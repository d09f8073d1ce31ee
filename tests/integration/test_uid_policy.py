"""Only instances that can be forwarded are acknowledged, under the one UID they carry.

A dataset without (0008,0016) SOP Class UID or (0008,0018) SOP Instance UID is
refused with 0xC221 ("cannot understand"); a dataset whose UIDs differ from the
C-STORE's Affected SOP Class/Instance UID with 0xA900 ("data set does not match
SOP Class"). Each refusal carries an ErrorComment, leaves no row and no file,
and is logged with both UIDs; an accepted instance is logged, queued and
answered under the same UID.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import _config
from pynetdicom.dsutils import encode

from stowaway.db.engine import make_engine
from stowaway.db.migrate import upgrade_to_head
from stowaway.receiver.status import DATASET_DOES_NOT_MATCH, MISSING_SOP_UID, SUCCESS
from tests.conftest import StowawayFactory
from tests.durability.harness import (
    CALLED_AET,
    Corpus,
    new_ae,
    nodelay,
    partial_files,
    queue_rows,
    spool_files,
    write_part10,
)
from tests.support.databases import sqlite_url

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::ResourceWarning")]


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """SQLite only: the policy is the receiver's, whatever the queue database."""
    url = sqlite_url(tmp_path)
    engine = make_engine(url)
    upgrade_to_head(engine)
    engine.dispose()
    yield url


def store_file(port: int, path: Path, sop_class_uid: str = CTImageStorage) -> Dataset:
    """C-STORE a Part-10 file as it is: its file meta makes the Affected SOP UIDs and
    its dataset bytes go out untouched, whatever they say. Returns the response."""
    ae = new_ae("UIDTEST", [(sop_class_uid, ExplicitVRLittleEndian)])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=CALLED_AET)
        assert assoc.is_established
        nodelay(assoc)
        response = assoc.send_c_store(path)
        assoc.release()
        return response
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        ae.shutdown()


def part10(tmp_path: Path, name: str, affected: tuple[str, str], ds: Dataset) -> Path:
    path = tmp_path / f"{name}.dcm"
    body = encode(ds, False, True)
    assert body is not None
    write_part10(path, affected[0], affected[1], [body])
    return path


def test_instances_that_cannot_be_forwarded_are_refused(
    stowaway: StowawayFactory, tmp_path: Path, db_url: str
) -> None:
    proc = stowaway("receive")
    corpus = Corpus("uid-policy", 5)
    no_class, no_instance, other_instance, other_class = (corpus.dataset(i) for i in range(4))
    del no_class.SOPClassUID
    del no_instance.SOPInstanceUID
    cases = {
        "no SOP Class UID": (
            (CTImageStorage, corpus.uid(0)),
            no_class,
            MISSING_SOP_UID,
            "Dataset has no SOP Class UID (0008,0016)",
        ),
        "no SOP Instance UID": (
            (CTImageStorage, "1.2.3.4.5.6"),
            no_instance,
            MISSING_SOP_UID,
            "Dataset has no SOP Instance UID (0008,0018)",
        ),
        "other SOP Instance UID": (
            (CTImageStorage, "1.2.3.4.5.7"),
            other_instance,
            DATASET_DOES_NOT_MATCH,
            "SOP Instance UID differs from the C-STORE's",
        ),
        "other SOP Class UID": (
            (MRImageStorage, corpus.uid(3)),
            other_class,
            DATASET_DOES_NOT_MATCH,
            "SOP Class UID differs from the C-STORE's",
        ),
    }
    for k, (what, (affected, ds, code, comment)) in enumerate(cases.items()):
        response = store_file(proc.port, part10(tmp_path, f"case{k}", affected, ds), affected[0])
        assert int(response.Status) == code, what
        assert response.ErrorComment == comment, what
    assert queue_rows(db_url) == []
    spool = proc.data_dir / "spool"
    assert spool_files(spool) == [] and partial_files(spool) == []
    log = proc.log()
    assert (
        "store_rejected sop_instance_uid=1.2.3.4.5.7 calling_aet=UIDTEST peer=127.0.0.1:"
    ) in log
    assert f"dataset_sop_instance_uid={corpus.uid(2)}" in log

    # A consistent instance: one UID in the response, the row and the log.
    good = corpus.dataset(4)
    response = store_file(
        proc.port, part10(tmp_path, "good", (CTImageStorage, corpus.uid(4)), good)
    )
    assert int(response.Status) == SUCCESS
    assert [r.sop_instance_uid for r in queue_rows(db_url)] == [corpus.uid(4)]
    assert f"instance_stored sop_instance_uid={corpus.uid(4)} " in proc.log()
    assert proc.stop() == 0
