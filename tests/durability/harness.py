"""The durability harness: recording senders, a seeded kill driver, and the invariant.

The invariant every scenario ends with (issue 6): let A be the SOP Instance UIDs
senders saw acknowledged with Success (0x0000). At the end, every UID in A is in
the destination with byte-identical dataset content, or is a ``failed`` or
``pending`` row whose spool file is present and intact (``Spool.verify``, and its
dataset bytes are the ones sent); no UID outside what was sent appears in the
destination or the queue.

Senders are pynetdicom SCUs in threads of the test process, so each instance's
response status is known exactly. Instances are generated in memory from a tag
and an index; the SHA-256 of the dataset bytes pynetdicom puts on the wire
(everything after the file meta) is recorded when an instance is first sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import re
import socket
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode

from stowaway.db.engine import make_engine
from stowaway.db.models import Status, utcnow
from stowaway.db.part10 import dataset_offset, part10_header
from stowaway.db.queue import NewInstance, Queue, QueuedInstance
from stowaway.db.spool import COPY_CHUNK, Spool
from tests.support.dicom_files import dataset_bytes, uid_for
from tests.support.healthcare_stub import HealthcareStub
from tests.support.orthanc import OrthancServer
from tests.support.processes import StowawayProcess

#: Every scenario's randomness derives from this seed (printed with its counts).
BASE_SEED = int(os.environ.get("STOWAWAY_DURABILITY_SEED", "6"))

#: Fast retry settings for forwarders under test.
FAST_FORWARD = (
    "--poll-interval",
    "50ms",
    "--backoff-initial",
    "100ms",
    "--backoff-max",
    "1s",
    "--auth",
    "none",
    # serve forwards while it receives, so the scenarios' kills and faults hit
    # both at once (by default uploads wait for a transfer's first 10 s).
    "--sender-first",
    "0",
)

CALLED_AET = "IMPORTADAPTER"
SUCCESS = 0x0000


def scenario_seed(name: str) -> int:
    """A per-scenario seed derived from ``STOWAWAY_DURABILITY_SEED``."""
    return zlib.crc32(f"{BASE_SEED}/{name}".encode())


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


#: Multiplies the CI sizes (instances, kill cycles): STOWAWAY_DURABILITY_SCALE=3
#: runs every scenario three times bigger without ``--soak``.
SCALE = float(os.environ.get("STOWAWAY_DURABILITY_SCALE", "1"))


def scaled(n: int) -> int:
    """A CI size, multiplied by STOWAWAY_DURABILITY_SCALE."""
    return max(1, round(n * SCALE))


# -- instances ------------------------------------------------------------------


class Corpus:
    """Deterministic CT instances made in memory: ``tag`` and an index name each one.

    ``per_study`` instances share a study (the forwarder batches by study).
    """

    def __init__(
        self, tag: str, count: int, *, rows: int = 64, cols: int = 64, per_study: int = 40
    ) -> None:
        self.tag = tag
        self.count = count
        self.rows = rows
        self.cols = cols
        self.per_study = per_study

    def uid(self, index: int) -> str:
        return uid_for(self.tag, "sop", index)

    def uids(self) -> list[str]:
        return [self.uid(i) for i in range(self.count)]

    def dataset(self, index: int) -> Dataset:
        study = index // self.per_study
        study_uid = uid_for(self.tag, "study", study)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = self.uid(index)
        ds.StudyDate = "20240102"
        ds.Modality = "CT"
        ds.PatientName = "Durability^Test"
        ds.PatientID = f"DUR-{self.tag}"[:64]
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = uid_for(self.tag, "series", study)
        ds.InstanceNumber = index + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = self.rows
        ds.Columns = self.cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        rng = random.Random(f"{self.tag}/pixels/{index}")
        ds.PixelData = rng.randbytes(self.rows * self.cols * 2)
        ds["PixelData"].VR = "OW"
        return ds


def wire_digest(ds: Dataset) -> str:
    """SHA-256 of the dataset bytes pynetdicom sends for ``ds`` (explicit VR LE)."""
    encoded = encode(ds, False, True)
    assert encoded is not None, "dataset cannot be encoded"
    return hashlib.sha256(encoded).hexdigest()


# -- what the senders saw ---------------------------------------------------------


@dataclass
class Ledger:
    """What every sender sent and what it was answered, thread-safe."""

    #: UID -> SHA-256 of the dataset bytes sent (for every UID sent at least once)
    digests: dict[str, str] = field(default_factory=dict)
    #: A: UIDs answered 0x0000 at least once
    acked: set[str] = field(default_factory=set)
    #: response statuses seen ("0xA700", "none" for an abort or a lost association)
    statuses: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def sent(self) -> set[str]:
        with self.lock:
            return set(self.digests)

    def record_sent(self, uid: str, digest: str) -> None:
        with self.lock:
            previous = self.digests.setdefault(uid, digest)
        assert previous == digest, f"{uid} sent with two different contents"

    def record_status(self, uid: str, status: int | None) -> None:
        with self.lock:
            self.statuses["none" if status is None else f"0x{status:04X}"] += 1
            if status == SUCCESS:
                self.acked.add(uid)

    def record_expected(self, uid: str, digest: str, acked: bool) -> None:
        """For senders outside this module (raw sockets, big files)."""
        self.record_sent(uid, digest)
        self.record_status(uid, SUCCESS if acked else None)


class Target:
    """Where senders connect: follows a receiver across restarts."""

    def __init__(self, port: int = 0) -> None:
        self.port = port


def new_ae(
    calling_aet: str,
    contexts: Sequence[tuple[str, str]] = ((CTImageStorage, ExplicitVRLittleEndian),),
) -> AE:
    """A sending AE with short timeouts, proposing ``contexts`` (abstract, transfer syntax)."""
    ae = AE(ae_title=calling_aet)
    for abstract_syntax, transfer_syntax in contexts:
        ae.add_requested_context(abstract_syntax, transfer_syntax)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    ae.connection_timeout = 2
    return ae


class Sender(threading.Thread):
    """One modality: sends its instances over associations until each is acknowledged.

    An instance answered with a failure status goes to the back of the line and
    is sent again after ``retry_delay``; an association that breaks is
    re-established (to ``target.port``, which follows restarts). Stops at
    ``deadline`` (monotonic) or when ``stop`` is set; ``unacked`` is what was left.
    """

    def __init__(
        self,
        corpus: Corpus,
        indices: Iterable[int],
        target: Target,
        ledger: Ledger,
        *,
        deadline: float,
        calling_aet: str = "DURABILITY",
        retry_delay: float = 0.2,
        pace: float = 0.0,
        per_association: int | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        super().__init__(daemon=True, name=f"sender-{calling_aet}")
        self.corpus = corpus
        self.pending = deque(indices)
        self.target = target
        self.ledger = ledger
        self.deadline = deadline
        self.calling_aet = calling_aet
        self.retry_delay = retry_delay
        self.pace = pace
        self.per_association = per_association
        self.stop_event = stop or threading.Event()
        self.associations = 0
        self.error: BaseException | None = None

    @property
    def unacked(self) -> list[int]:
        return list(self.pending)

    def _running(self) -> bool:
        return (
            bool(self.pending) and time.monotonic() < self.deadline and not self.stop_event.is_set()
        )

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced by join_all
            self.error = exc

    def _run(self) -> None:
        ae = new_ae(self.calling_aet)
        while self._running():
            try:
                assoc = ae.associate("127.0.0.1", self.target.port, ae_title=CALLED_AET)
            except Exception:
                time.sleep(self.retry_delay)
                continue
            if not assoc.is_established:
                time.sleep(self.retry_delay)
                continue
            self.associations += 1
            nodelay(assoc)
            try:
                self._send_on(assoc)
            finally:
                with contextlib.suppress(Exception):
                    if assoc.is_established:
                        assoc.release()
        ae.shutdown()

    def _send_on(self, assoc: Any) -> None:
        sent_here = 0
        while self._running():
            if self.per_association is not None and sent_here >= self.per_association:
                return
            index = self.pending[0]
            ds = self.corpus.dataset(index)
            uid = str(ds.SOPInstanceUID)
            self.ledger.record_sent(uid, wire_digest(ds))
            try:
                response = assoc.send_c_store(ds)
                status = int(response.Status) if "Status" in response else None
            except Exception:
                status = None
            self.ledger.record_status(uid, status)
            sent_here += 1
            if status == SUCCESS:
                self.pending.popleft()
                if self.pace:
                    time.sleep(self.pace)
            elif status is None or not assoc.is_established:
                return  # the association is gone: establish a new one
            else:
                self.pending.rotate(-1)
                time.sleep(self.retry_delay)


def nodelay(assoc: Any) -> None:
    """Get a sending association ready for a fast, reliable sender.

    * TCP_NODELAY: without it Nagle's algorithm and the peer's delayed ACK cost
      ~40 ms per C-STORE on loopback.
    * pynetdicom 3's requestor reactor can take a C-STORE response off the queue
      between ``send_c_store``'s pause handshake and its own ``get_msg``, log
      "Received unexpected C-STORE service message", drop it, and leave the
      sender waiting out its DIMSE timeout (pynetdicom issues #435, #875). Under
      CPU load this happens about once in a thousand instances against a fast
      receiver. A sender of ours never gets unsolicited requests, so whatever the
      reactor picks up goes back on the queue for ``send_c_store``.
    """
    with contextlib.suppress(Exception):
        assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    assoc._serve_request = lambda msg, context_id: assoc.dimse.msg_queue.put((context_id, msg))


def write_part10(
    path: Path, sop_class_uid: str, sop_instance_uid: str, body: Iterable[bytes]
) -> str:
    """Write a Part-10 file whose dataset bytes are ``body`` (streamed, any size);
    returns their SHA-256, the digest the destination's copy must have."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        out.write(part10_header(sop_class_uid, sop_instance_uid, ExplicitVRLittleEndian))
        for chunk in body:
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def send_file(
    port: int,
    path: Path,
    *,
    calling_aet: str = "FILESENDER",
    context: tuple[str, str] | None = None,
) -> int | None:
    """C-STORE a Part-10 file streamed from disk (pynetdicom never decodes it, so
    the dataset bytes go out exactly as in the file, whatever they are).

    Returns the response status, or None when the association failed or broke.
    """
    from pydicom import dcmread
    from pynetdicom import _config

    if context is None:
        meta = dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta
        context = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
    ae = new_ae(calling_aet, [context])
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=CALLED_AET)
        if not assoc.is_established:
            return None
        nodelay(assoc)
        try:
            response = assoc.send_c_store(path)
        except Exception:
            return None
        status = int(response.Status) if "Status" in response else None
        if assoc.is_established:
            assoc.release()
        return status
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        ae.shutdown()


def split(indices: Sequence[int], parts: int) -> list[list[int]]:
    return [list(indices[k::parts]) for k in range(parts)]


def start_senders(
    corpus: Corpus,
    target: Target,
    ledger: Ledger,
    senders: int,
    *,
    deadline: float,
    indices: Sequence[int] | None = None,
    **kwargs: Any,
) -> list[Sender]:
    """``senders`` threads sharing ``indices`` (default: the whole corpus), started."""
    todo = range(corpus.count) if indices is None else indices
    threads = [
        Sender(corpus, chunk, target, ledger, deadline=deadline, calling_aet=f"MOD{k}", **kwargs)
        for k, chunk in enumerate(split(todo, senders))
    ]
    for thread in threads:
        thread.start()
    return threads


def join_all(senders: Sequence[Sender], timeout: float) -> int:
    """Wait for the senders; returns how many instances were left unacknowledged."""
    deadline = time.monotonic() + timeout
    for sender in senders:
        sender.join(max(0.1, deadline - time.monotonic()))
    for sender in senders:
        if sender.error is not None:
            raise sender.error
    return sum(len(s.unacked) for s in senders)


def seed_acknowledged(
    db_url: str,
    spool_dir: Path,
    corpus: Corpus,
    ledger: Ledger,
    indices: Iterable[int] | None = None,
    node_id: str = "",
) -> None:
    """Spool and enqueue instances exactly as the receiver does before it answers
    Success, and count them as acknowledged: for scenarios about the forwarder."""
    spool = Spool(spool_dir)
    spool.prepare()
    engine = make_engine(db_url)
    queue = Queue(engine)
    try:
        for index in range(corpus.count) if indices is None else indices:
            ds = corpus.dataset(index)
            encoded = encode(ds, False, True)
            assert encoded is not None
            uid = str(ds.SOPInstanceUID)
            header = part10_header(str(ds.SOPClassUID), uid, ExplicitVRLittleEndian)
            spooled = spool.write(header, io.BytesIO(encoded), utcnow())
            queue.enqueue(
                NewInstance(
                    sop_instance_uid=uid,
                    sop_class_uid=str(ds.SOPClassUID),
                    study_instance_uid=str(ds.StudyInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    transfer_syntax_uid=ExplicitVRLittleEndian,
                    calling_aet="SEED",
                    peer_address="127.0.0.1:0",
                    spool_path=spooled.relative_path,
                    size_bytes=spooled.size_bytes,
                    sha256=spooled.sha256,
                    node_id=node_id,
                )
            )
            ledger.record_expected(uid, hashlib.sha256(encoded).hexdigest(), acked=True)
    finally:
        engine.dispose()


# -- kill -9 --------------------------------------------------------------------


class KillDriver:
    """Starts a stowaway process, SIGKILLs it at seeded random moments, restarts it.

    ``start`` returns a running process (the ``stowaway`` fixture); ``on_start``
    sees each new one (e.g. to point a :class:`Target` at its port).
    """

    def __init__(
        self,
        start: Callable[[], StowawayProcess],
        rng: random.Random,
        on_start: Callable[[StowawayProcess], None] = lambda _p: None,
        ready: Callable[[StowawayProcess], None] = lambda _p: None,
    ) -> None:
        self.start = start
        self.rng = rng
        self.on_start = on_start
        # Waits until a new process is doing work, so that kills land mid-work.
        self.ready = ready
        self.kills = 0
        self.current: StowawayProcess | None = None

    def launch(self) -> StowawayProcess:
        self.current = self.start()
        self.on_start(self.current)
        return self.current

    def restart(self, down: tuple[float, float] = (0.0, 0.3)) -> StowawayProcess:
        """kill -9 the current process now, wait ``down`` seconds, start a new one."""
        if self.current is not None:
            self.current.kill()
            self.kills += 1
            self.current = None
        time.sleep(self.rng.uniform(*down))
        return self.launch()

    def run(
        self,
        cycles: int,
        up: tuple[float, float] = (0.3, 1.5),
        down: tuple[float, float] = (0.0, 0.3),
        until: Callable[[], bool] = lambda: False,
    ) -> StowawayProcess:
        """``cycles`` rounds of start, run ``up`` seconds, kill -9, wait ``down``; then start."""
        for _ in range(cycles):
            if until():
                break
            proc = self.current if self.current is not None else self.launch()
            self.ready(proc)
            time.sleep(self.rng.uniform(*up))
            proc.kill()
            self.kills += 1
            self.current = None
            time.sleep(self.rng.uniform(*down))
        return self.current if self.current is not None else self.launch()


def end(proc: StowawayProcess) -> None:
    """End a process the scenario no longer needs: kill -9, not SIGTERM.

    Whatever the way a process ends, the invariant must hold; a graceful stop is
    ``test_signals.py``'s subject (a SIGTERM that lands on a thread other than
    the main one is lost while ``stowaway/service.py`` waits without a timeout,
    and the fixture's stop would then wait 30 s).
    """
    if proc.proc is not None and proc.proc.poll() is None:
        proc.kill()


def wait_for_log(proc: StowawayProcess, text: str, timeout: float = 20.0) -> None:
    """Wait until ``text`` appears in the process's log (or it exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.log():
            return
        if proc.proc is not None and proc.proc.poll() is not None:
            raise AssertionError(
                f"stowaway exited with {proc.proc.returncode}:\n{proc.log()[-3000:]}"
            )
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not logged within {timeout} s")


# -- a network that can be cut ------------------------------------------------------


# -- destinations -------------------------------------------------------------------


class Destination(Protocol):
    def uids(self) -> set[str]: ...

    def dataset_digest(self, uid: str) -> str: ...


class StubDestination:
    """The Healthcare API stub's ``stored`` instances."""

    def __init__(self, stub: HealthcareStub) -> None:
        self.stub = stub

    def uids(self) -> set[str]:
        return set(self.stub.stored)

    def dataset_digest(self, uid: str) -> str:
        return hashlib.sha256(dataset_bytes(self.stub.stored[uid])).hexdigest()


def uploads_per_uid(stub: HealthcareStub) -> Counter[str]:
    """How many STOW-RS requests carried each SOP Instance UID (faulted ones too)."""
    return Counter(
        u for r in list(stub.requests) if r.method == "POST" for u in r.sop_instance_uids
    )


class OrthancDestination:
    """A real Orthanc's stored instances (Orthanc rewrites the file meta, never the dataset)."""

    def __init__(self, orthanc: OrthancServer) -> None:
        self.orthanc = orthanc

    def uids(self) -> set[str]:
        return self.orthanc.instance_uids()

    def dataset_digest(self, uid: str) -> str:
        return hashlib.sha256(dataset_bytes(self.orthanc.instance_bytes(uid))).hexdigest()


class NoDestination:
    """Receiver-only scenarios: everything acknowledged must wait in the queue."""

    def uids(self) -> set[str]:
        return set()

    def dataset_digest(self, uid: str) -> str:
        raise KeyError(uid)


# -- the queue and the spool --------------------------------------------------------


def queue_rows(db_url: str) -> list[QueuedInstance]:
    engine = make_engine(db_url)
    try:
        return Queue(engine).rows()
    finally:
        engine.dispose()


def drained(db_url: str) -> bool:
    """Nothing pending or in flight (everything done or failed)."""
    counts = Counter(r.status for r in queue_rows(db_url))
    return counts[Status.PENDING] == 0 and counts[Status.IN_FLIGHT] == 0


def spool_dataset_digest(path: Path) -> str:
    """SHA-256 of a spool file's dataset bytes (after the file meta), streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(dataset_offset(f))
        while chunk := f.read(COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def partial_files(spool_dir: Path) -> list[Path]:
    """Files left in ``incoming/`` and ``tmp/``: partial receipts."""
    return sorted(
        p
        for d in ("incoming", "tmp")
        if (spool_dir / d).is_dir()
        for p in (spool_dir / d).iterdir()
    )


def spool_files(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob("[0-9][0-9][0-9][0-9]/*/*/*/*.dcm"))


# -- the invariant -----------------------------------------------------------------


def backend(db_url: str) -> str:
    """``postgres`` or ``sqlite``: names a scenario by its queue database."""
    return "postgres" if db_url.startswith("postgresql") else "sqlite"


class InvariantViolation(AssertionError):
    """An acknowledged instance lost or altered, or an instance never sent appearing.

    Never re-run away: ``conftest.py`` excludes it from pytest-rerunfailures.
    """


@dataclass
class InvariantReport:
    scenario: str
    seed: int
    sent: int
    acknowledged: int
    in_destination: int
    waiting_failed: int
    waiting_pending: int
    lost: list[str]
    corrupt: list[str]
    unexpected: list[str]
    #: sent, never acknowledged, yet delivered (a crash after the commit, before the answer)
    unacked_delivered: int
    statuses: dict[str, int]
    rows: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "in_destination": self.in_destination,
            "waiting_failed": self.waiting_failed,
            "waiting_pending": self.waiting_pending,
            "lost": len(self.lost),
            "corrupt": len(self.corrupt),
            "unexpected": len(self.unexpected),
            "unacked_delivered": self.unacked_delivered,
            "statuses": self.statuses,
            "rows": self.rows,
            **self.extra,
        }

    def line(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return (
            f"durability[{self.scenario}] seed={self.seed} sent={self.sent} "
            f"acknowledged={self.acknowledged} in_destination={self.in_destination} "
            f"waiting_failed={self.waiting_failed} waiting_pending={self.waiting_pending} "
            f"lost={len(self.lost)} corrupt={len(self.corrupt)} "
            f"unexpected={len(self.unexpected)} unacked_delivered={self.unacked_delivered} "
            f"statuses={dict(sorted(self.statuses.items()))} "
            f"rows={dict(sorted(self.rows.items()))}" + (f" {extra}" if extra else "")
        )


def check_invariant(
    scenario: str,
    ledger: Ledger,
    *,
    db_url: str,
    spool_dir: Path,
    destination: Destination,
    record_property: Callable[[str, object], None],
    seed: int = 0,
    **extra: Any,
) -> InvariantReport:
    """Check the invariant, print and record the counts; AssertionError on any loss."""
    with ledger.lock:
        digests = dict(ledger.digests)
        acked = set(ledger.acked)
        statuses = dict(ledger.statuses)
    rows = queue_rows(db_url)
    spool = Spool(spool_dir)
    by_uid: dict[str, list[QueuedInstance]] = {}
    for row in rows:
        by_uid.setdefault(row.sop_instance_uid, []).append(row)
    in_destination = destination.uids()

    corrupt: list[str] = []
    for uid in in_destination & set(digests):
        if destination.dataset_digest(uid) != digests[uid]:
            corrupt.append(uid)
    unexpected = sorted((in_destination | set(by_uid)) - set(digests))

    delivered = waiting_failed = waiting_pending = 0
    lost: list[str] = []
    for uid in sorted(acked):
        if uid in in_destination and uid not in corrupt:
            delivered += 1
            continue
        waiting = [
            r
            for r in by_uid.get(uid, [])
            if r.status in (Status.FAILED, Status.PENDING) and _intact(spool, r, digests[uid])
        ]
        if any(r.status == Status.PENDING for r in waiting):
            waiting_pending += 1
        elif waiting:
            waiting_failed += 1
        else:
            lost.append(uid)

    report = InvariantReport(
        scenario=scenario,
        seed=seed,
        sent=len(digests),
        acknowledged=len(acked),
        in_destination=delivered,
        waiting_failed=waiting_failed,
        waiting_pending=waiting_pending,
        lost=lost,
        corrupt=sorted(corrupt),
        unexpected=unexpected,
        unacked_delivered=len((in_destination & set(digests)) - acked),
        statuses=statuses,
        rows={str(k): v for k, v in Counter(r.status.value for r in rows).items()},
        extra=extra,
    )
    print(report.line())
    record_property("durability", report.as_dict())
    if report.lost:
        raise InvariantViolation(
            f"{len(lost)} acknowledged instances lost, e.g. {lost[:3]}: {report.line()}"
        )
    if report.corrupt:
        raise InvariantViolation(f"content differs in the destination: {corrupt[:3]}")
    if report.unexpected:
        raise InvariantViolation(f"UIDs that were never sent: {unexpected[:3]}")
    return report


class Scenario:
    """What every scenario starts and ends with: a seed from its name (printed with its
    counts, so a failure replays with the same ``STOWAWAY_DURABILITY_SEED``), a random
    generator and a corpus from that seed, the ledger of what was sent, and the invariant
    checked against its queue and spool at the end.
    """

    def __init__(
        self,
        name: str,
        ledger: Ledger,
        record_property: Callable[[str, object], None],
        *,
        db_url: str,
        spool_dir: Path,
        seed: int | None = None,
    ) -> None:
        self.name = name
        self.seed = scenario_seed(name) if seed is None else seed
        self.rng = random.Random(self.seed)
        self.ledger = ledger
        self.db_url = db_url
        self.spool_dir = spool_dir
        self._record_property = record_property

    def corpus(self, count: int, **shape: Any) -> Corpus:
        """``count`` instances of this scenario (and seed); ``shape`` as for :class:`Corpus`."""
        return Corpus(f"{self.name}-{self.seed}", count, **shape)

    def check(self, destination: Destination, **extra: Any) -> InvariantReport:
        """:func:`check_invariant` for this scenario; ``extra`` is printed with the counts."""
        return check_invariant(
            self.name,
            self.ledger,
            db_url=self.db_url,
            spool_dir=self.spool_dir,
            destination=destination,
            record_property=self._record_property,
            seed=self.seed,
            **extra,
        )


#: ``scenario(name, db_url, seed=None, spool_dir=None)``: the durability conftest's fixture.
ScenarioFactory = Callable[..., Scenario]


def _intact(spool: Spool, row: QueuedInstance, expected_digest: str) -> bool:
    if spool.verify(row.spool_path, row.size_bytes, row.sha256) is not None:
        return False
    return spool_dataset_digest(spool.absolute(row.spool_path)) == expected_digest


# -- peak memory ------------------------------------------------------------------


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a live process (its peak resident set size)."""
    text = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", text, re.MULTILINE)
    assert match, "no VmHWM in /proc/PID/status"
    return int(match.group(1)) * 1024


__all__ = [
    "BASE_SEED",
    "CALLED_AET",
    "FAST_FORWARD",
    "SUCCESS",
    "Corpus",
    "Destination",
    "InvariantReport",
    "InvariantViolation",
    "KillDriver",
    "Ledger",
    "NoDestination",
    "OrthancDestination",
    "Scenario",
    "ScenarioFactory",
    "Sender",
    "StubDestination",
    "Target",
    "backend",
    "check_invariant",
    "drained",
    "end",
    "env_int",
    "join_all",
    "new_ae",
    "nodelay",
    "partial_files",
    "peak_rss_bytes",
    "queue_rows",
    "scaled",
    "scenario_seed",
    "seed_acknowledged",
    "send_file",
    "spool_dataset_digest",
    "spool_files",
    "start_senders",
    "uploads_per_uid",
    "wait_for_log",
    "wire_digest",
    "write_part10",
]
