"""The benchmark's cases: ingest, forward, end to end and memory (claim is in bench.claim).

Each case runs every system it compares once per repetition, interleaved
(all systems in run 1, then all in run 2, ...), so that a slow moment of the
machine hits them alike. Every process gets a fresh working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.data import InstanceSet, huge_instance
from bench.procs import REPO, STORESCP, Sender, Service, python
from bench.results import Row
from tests.support.orthanc import OrthancServer
from tests.support.processes import free_port


@dataclass
class Context:
    """What every case needs: where to work, how often, how long at most."""

    workdir: Path
    repeat: int
    timeout: float
    sender: Sender
    log: Callable[[str], None]
    #: one Orthanc for every run, emptied in between (--quick), else a fresh one per run
    shared_orthanc: bool = False
    shared_server: OrthancServer | None = None

    def close(self) -> None:
        if self.shared_server is not None:
            self.shared_server.stop()
            self.shared_server = None

    def fresh(self, name: str) -> Path:
        """An empty working directory, with the disk settled before the next system starts.

        Deleting the previous run's files and flushing its dirty pages leave work
        for the file system's next journal commit (on a disk mounted with
        ``discard``, the discards too): without the sync, only a system that
        fsyncs would wait for it.
        """
        path = self.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        os.sync()
        path.mkdir(parents=True)
        return path


# -- receivers ---------------------------------------------------------------------

#: label -> (how it is started, a note for the table)
RECEIVERS = {
    "stowaway receive": "fsync + committed row per instance",
    "bare pynetdicom": "default AE, chunked receive, moves the file, no fsync",
    "storescp": "DCMTK 3.6.7, default environment, no fsync",
    "storescp TCP_NODELAY=1": "DCMTK 3.6.7, TCP_NODELAY=1 in its environment, no fsync",
}


def start_receiver(ctx: Context, system: str, workdir: Path) -> tuple[Service, int]:
    port = free_port()
    log = workdir.parent / f"{workdir.name}.log"
    env: dict[str, str] = {}
    if system == "stowaway receive":
        args = stowaway_args("receive", workdir, port)
    elif system == "bare pynetdicom":
        args = python(str(REPO / "bench/baselines/bare_pynetdicom.py"), "--port", str(port))
        args += ["--out", str(workdir)]
    elif system.startswith("storescp"):
        # --fork: one process per association, so concurrent senders are served at once.
        args = [STORESCP, "--fork", "--output-directory", str(workdir), str(port)]
        if "TCP_NODELAY" in system:
            env["TCP_NODELAY"] = "1"
    else:
        raise ValueError(system)
    return Service(args, log, env).start(port), port


def stowaway_args(command: str, data_dir: Path, port: int | None, *extra: str) -> list[str]:
    args = python("-m", "stowaway.cli", command, "--data-dir", str(data_dir))
    args += ["--http-host", "127.0.0.1", "--http-port", str(free_port())]
    args += ["--min-free-disk", "1MiB", "--grace-period", "10"]
    if port is not None:
        args += ["--host", "127.0.0.1", "--port", str(port)]
    return [*args, *extra]


def ingest(ctx: Context, dataset: InstanceSet, senders: int, systems: list[str]) -> list[Row]:
    """Case 1: ``dcmsend`` of ``dataset`` over ``senders`` associations into each system."""
    label = f"{senders} sender{'s' if senders > 1 else ''}"
    rows = {
        s: Row("ingest", f"{dataset.name}, {label}", s, dataset.count, dataset.total_bytes)
        for s in systems
    }
    for run in range(ctx.repeat):
        for system in systems:
            workdir = ctx.fresh(f"ingest-{system.replace(' ', '_')}")
            service, port = start_receiver(ctx, system, workdir)
            try:
                sent = ctx.sender.send(port, dataset.files, senders, timeout=ctx.timeout)
                service.sample_rss()
            finally:
                service.stop()
            if sent.succeeded != dataset.count:
                raise RuntimeError(
                    f"{system}: {sent.succeeded}/{dataset.count} stored\n{sent.output[-1500:]}"
                    f"\n{service.log_tail()}"
                )
            row = rows[system]
            row.seconds.append(sent.seconds)
            if service.peak_rss_mb is not None:
                row.peak_rss_mb.append(service.peak_rss_mb)
            ctx.log(
                f"  ingest {dataset.name} x{senders} {system}: run {run + 1} {sent.seconds:.2f} s"
            )
            shutil.rmtree(workdir, ignore_errors=True)
    for system, row in rows.items():
        row.note = RECEIVERS[system]
        if system != "bare pynetdicom" and "bare pynetdicom" in rows:
            row.baseline = rows["bare pynetdicom"].key
    return list(rows.values())


# -- the queue database, read directly for timing -----------------------------------


def _queue_db(data_dir: Path) -> Path:
    return data_dir / "queue.db"


def status_counts(data_dir: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{_queue_db(data_dir)}?mode=ro", uri=True, timeout=10) as db:
        return dict(db.execute("SELECT status, count(*) FROM instances GROUP BY status").fetchall())


def last_forwarded(data_dir: Path) -> float:
    with sqlite3.connect(f"file:{_queue_db(data_dir)}?mode=ro", uri=True, timeout=10) as db:
        (value,) = db.execute("SELECT max(forwarded_at) FROM instances").fetchone()
    return datetime.fromisoformat(str(value)).replace(tzinfo=UTC).timestamp()


def wait_forwarded(
    data_dir: Path, count: int, timeout: float, service: Service
) -> tuple[float, float]:
    """Poll until ``count`` rows are done; returns (first claim seen, last forwarded_at)."""
    deadline = time.monotonic() + timeout
    first_claim: float | None = None
    while time.monotonic() < deadline:
        counts = status_counts(data_dir)
        now = time.time()
        if first_claim is None and counts.get("pending", 0) < count:
            first_claim = now
        if counts.get("failed", 0):
            raise RuntimeError(f"forwarding failed: {counts}\n{service.log_tail()}")
        if counts.get("done", 0) >= count:
            assert first_claim is not None
            return first_claim, last_forwarded(data_dir)
        if service.proc is not None and service.proc.poll() is not None:
            raise RuntimeError(f"forwarder exited: {service.log_tail()}")
        time.sleep(0.005)
    raise TimeoutError(f"not all {count} instances forwarded within {timeout} s")


def filled_queue(ctx: Context, dataset: InstanceSet) -> Path:
    """A stowaway data directory holding ``dataset`` as pending rows (received once, untimed)."""
    template = ctx.workdir / f"queue-{dataset.name}"
    if template.is_dir() and status_counts(template).get("pending") == dataset.count:
        return template
    shutil.rmtree(template, ignore_errors=True)
    template.mkdir(parents=True)
    port = free_port()
    with Service(stowaway_args("receive", template, port), ctx.workdir / "fill.log").start(port):
        sent = ctx.sender.send(port, dataset.files, timeout=ctx.timeout)
    if sent.succeeded != dataset.count:
        raise RuntimeError(f"filling the queue stored {sent.succeeded}/{dataset.count}")
    return template


# -- forward ----------------------------------------------------------------------------


def forward(ctx: Context, dataset: InstanceSet, batch_sizes: list[int]) -> list[Row]:
    """Case 2: a full queue drained by ``stowaway forward`` into Orthanc, against POST loops."""
    template = filled_queue(ctx, dataset)
    listing = ctx.workdir / f"files-{dataset.name}.txt"
    listing.write_text("\n".join(map(str, dataset.files)))
    ours = Row("forward", dataset.name, "stowaway forward", dataset.count, dataset.total_bytes)
    ours.note = "defaults: --workers 4, --max-workers 16, --batch-max-instances 50"
    loops = {
        b: Row("forward", dataset.name, f"POST loop, batch {b}", dataset.count, dataset.total_bytes)
        for b in batch_sizes
    }
    best = Row("forward", dataset.name, "POST loop, best batch", dataset.count, dataset.total_bytes)
    for run in range(ctx.repeat):
        data_dir = ctx.fresh("forward-data")
        shutil.rmtree(data_dir)
        shutil.copytree(template, data_dir)
        with orthanc(ctx) as server:
            args = stowaway_args("forward", data_dir, None, "--dicomweb-url", server.dicomweb_url)
            with Service(args, ctx.workdir / "forward.log").start() as service:
                first, last = wait_forwarded(data_dir, dataset.count, ctx.timeout, service)
                service.sample_rss()
            _check_count(server, dataset.count)
        ours.seconds.append(last - first)
        if service.peak_rss_mb is not None:
            ours.peak_rss_mb.append(service.peak_rss_mb)
        ctx.log(f"  forward {dataset.name} stowaway: run {run + 1} {last - first:.2f} s")
        fastest = None
        for batch in batch_sizes:
            with orthanc(ctx) as server:
                seconds = post_loop(ctx, server.dicomweb_url, batch, listing)
                _check_count(server, dataset.count)
            loops[batch].seconds.append(seconds)
            fastest = seconds if fastest is None else min(fastest, seconds)
            ctx.log(
                f"  forward {dataset.name} POST loop batch {batch}: run {run + 1} {seconds:.2f} s"
            )
        assert fastest is not None
        best.seconds.append(fastest)
        shutil.rmtree(data_dir, ignore_errors=True)
    best.note = "fastest batch size of each run"
    for row in [ours, *loops.values()]:
        row.baseline = best.key
    return [ours, best, *loops.values()]


@contextmanager
def orthanc(ctx: Context) -> Iterator[OrthancServer]:
    """A fresh Orthanc (with DICOMweb) for one run.

    With ``ctx.shared_orthanc`` (``--quick``) one server is started once and
    emptied before each run instead: a start costs seconds, a quick run less.
    """
    if ctx.shared_orthanc:
        if ctx.shared_server is None:
            ctx.shared_server = OrthancServer(ctx.fresh("orthanc"), startup_timeout=60).start()
        ctx.shared_server.reset()
        yield ctx.shared_server
        return
    workdir = ctx.fresh("orthanc")
    server = OrthancServer(workdir, startup_timeout=60).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _check_count(server: OrthancServer, count: int) -> None:
    stored = server.count()
    if stored != count:
        raise RuntimeError(f"Orthanc holds {stored} instances, expected {count}")


def post_loop(ctx: Context, url: str, batch: int, listing: Path) -> float:
    args = python(str(REPO / "bench/baselines/post_loop.py"), "--url", url)
    args += ["--batch", str(batch), "--list", str(listing)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=ctx.timeout, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"POST loop failed: {done.stderr[-1500:]}")
    return float(json.loads(done.stdout)["seconds"])


# -- end to end -----------------------------------------------------------------------------


def end_to_end(ctx: Context, dataset: InstanceSet, ingest_row: Row | None) -> list[Row]:
    """Case 3: ``stowaway serve``, first C-STORE to the last instance stored in Orthanc."""
    whole = Row(
        "e2e",
        dataset.name,
        "stowaway serve, first C-STORE to last in Orthanc",
        dataset.count,
        dataset.total_bytes,
    )
    sender_view = Row(
        "e2e", dataset.name, "stowaway serve, sender's view", dataset.count, dataset.total_bytes
    )
    for run in range(ctx.repeat):
        data_dir = ctx.fresh("e2e-data")
        port = free_port()
        with orthanc(ctx) as server:
            args = stowaway_args("serve", data_dir, port, "--dicomweb-url", server.dicomweb_url)
            with Service(args, ctx.workdir / "e2e.log").start(port) as service:
                sent = ctx.sender.send(port, dataset.files, timeout=ctx.timeout)
                if sent.succeeded != dataset.count:
                    raise RuntimeError(f"serve stored {sent.succeeded}/{dataset.count}")
                _first, last = wait_forwarded(data_dir, dataset.count, ctx.timeout, service)
                service.sample_rss()
            _check_count(server, dataset.count)
        whole.seconds.append(last - sent.first_request)
        sender_view.seconds.append(sent.seconds)
        for row in (whole, sender_view):
            if service.peak_rss_mb is not None:
                row.peak_rss_mb.append(service.peak_rss_mb)
        ctx.log(
            f"  e2e {dataset.name}: run {run + 1} sender {sent.seconds:.2f} s, "
            f"all in Orthanc after {last - sent.first_request:.2f} s"
        )
        shutil.rmtree(data_dir, ignore_errors=True)
    if ingest_row is not None:
        sender_view.baseline = ingest_row.key
        whole.baseline = ingest_row.key
    sender_view.note = "forwarding at the same time"
    return [sender_view, whole]


# -- memory -----------------------------------------------------------------------------------


def memory(ctx: Context, size_bytes: int) -> list[Row]:
    """Case 4: peak RSS receiving, then forwarding, one instance of ``size_bytes``."""
    path = huge_instance(size_bytes)
    size = path.stat().st_size
    label = f"1 instance of {size / 2**20:,.0f} MiB"
    receive = Row("memory", label, "stowaway receive", 1, size)
    send_on = Row("memory", label, "stowaway forward", 1, size)
    receive.note = "peak RSS of the receiver process"
    send_on.note = "to a discarding HTTP sink; peak RSS of the forwarder process"
    for run in range(ctx.repeat):
        data_dir = ctx.fresh("memory-data")
        port = free_port()
        with Service(stowaway_args("receive", data_dir, port), ctx.workdir / "mem.log").start(
            port
        ) as service:
            sent = ctx.sender.send(port, [path], timeout=ctx.timeout)
            service.sample_rss()
        if sent.succeeded != 1:
            raise RuntimeError(f"huge instance not stored:\n{sent.output[-1500:]}")
        receive.seconds.append(sent.seconds)
        receive.peak_rss_mb.append(service.peak_rss_mb or float("nan"))
        sink_port = free_port()
        sink = Service(
            python(str(REPO / "bench/sink.py"), "--port", str(sink_port)), ctx.workdir / "sink.log"
        ).start(sink_port)
        try:
            url = f"http://127.0.0.1:{sink_port}/dicom-web"
            args = stowaway_args("forward", data_dir, None, "--dicomweb-url", url)
            with Service(args, ctx.workdir / "mem-forward.log").start() as forwarder:
                first, last = wait_forwarded(data_dir, 1, ctx.timeout, forwarder)
                forwarder.sample_rss()
        finally:
            sink.stop()
        send_on.seconds.append(last - first)
        send_on.peak_rss_mb.append(forwarder.peak_rss_mb or float("nan"))
        ctx.log(
            f"  memory: run {run + 1} receive {receive.peak_rss_mb[-1]:.0f} MB, "
            f"forward {send_on.peak_rss_mb[-1]:.0f} MB"
        )
        shutil.rmtree(data_dir, ignore_errors=True)
    return [receive, send_on]
