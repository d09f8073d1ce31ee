"""The ``cores`` case: receiving over 1, 4 and 8 associations with one receiver process
and with ``--processes N`` (N: the CPUs available), against DCMTK ``storescp --fork``.

Every system is sent the same files by the same sender, ``dcmsend`` with
``TCP_NODELAY=1`` (so that Nagle's algorithm costs no system anything, see
docs/performance.md), split over k concurrent associations, one dcmsend each,
timed from the first C-STORE request to the last response. ``storescp --fork``
(one process per association, no fsync) with ``TCP_NODELAY=1`` in its own
environment too is the C++ ceiling, measured over the 4 associations only.
Before sending, stowaway must report every receiver process ready (``/readyz``),
so that no association lands on a process that is still starting. The load
average at each run is kept in the row (``extra["load"]``): the machine may be
shared.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request

from bench.cases import Context, stowaway_args
from bench.data import InstanceSet
from bench.procs import STORESCP, Service
from bench.results import Row, Target
from stowaway.receiver_pool import available_cpus
from tests.support.processes import free_port

ASSOCIATIONS = (1, 4, 8)
STORESCP_ASSOCIATIONS = 4
SENDER_ENV = {"TCP_NODELAY": "1"}
STORESCP_SYSTEM = "storescp --fork, TCP_NODELAY=1 both ends"


def _system(processes: int) -> str:
    return f"stowaway receive --processes {processes}"


def _data(dataset: InstanceSet, associations: int) -> str:
    return f"{dataset.name}, {associations} assoc"


def cores(ctx: Context, datasets: list[InstanceSet], *, quick: bool = False) -> list[Row]:
    """The rows of the case, every system interleaved run by run (``quick``: the first
    data set over 1 and 4 associations only)."""
    n = max(2, available_cpus())
    plan: list[tuple[InstanceSet, int, str]] = []
    for dataset in datasets[:1] if quick else datasets:
        for associations in ASSOCIATIONS[:2] if quick else ASSOCIATIONS:
            plan += [(dataset, associations, _system(1)), (dataset, associations, _system(n))]
        plan.append((dataset, STORESCP_ASSOCIATIONS, STORESCP_SYSTEM))
    rows = {
        (d.name, k, s): Row("cores", _data(d, k), s, d.count, d.total_bytes) for d, k, s in plan
    }
    for run in range(ctx.repeat):
        for dataset, associations, system in plan:
            row = rows[(dataset.name, associations, system)]
            try:
                seconds = _measure(ctx, dataset, associations, system)
            except TimeoutError as exc:
                # A hung transfer is a finding, not a reason to lose the other rows.
                row.extra.setdefault("timed_out", []).append(str(exc)[:200])
                ctx.log(f"  cores {dataset.name} x{associations} {system}: run {run + 1} {exc}")
                continue
            row.seconds.append(seconds)
            row.extra.setdefault("load", []).append(round(os.getloadavg()[0], 2))
            ctx.log(
                f"  cores {dataset.name} x{associations} {system}: run {run + 1} {seconds:.2f} s"
            )
    for (name, associations, system), row in rows.items():
        if system == STORESCP_SYSTEM:
            row.note = "DCMTK 3.6.7, one process per association, no fsync"
            row.baseline = rows[(name, associations, _system(n))].key
        else:
            row.note = "fsync + committed row per instance"
            row.baseline = rows[(name, 1, system)].key if associations > 1 else None
    return list(rows.values())


def _measure(ctx: Context, dataset: InstanceSet, associations: int, system: str) -> float:
    workdir = ctx.fresh(f"cores-{system.split()[-1].replace(',', '')}")
    port = free_port()
    log = workdir.parent / f"{workdir.name}.log"
    count = 0
    if system == STORESCP_SYSTEM:
        args = [STORESCP, "--fork", "--output-directory", str(workdir), str(port)]
        service = Service(args, log, SENDER_ENV).start(port)
    else:
        count = int(system.rsplit(" ", 1)[1])
        args = stowaway_args("receive", workdir, port, "--processes", str(count))
        service = Service(args, log).start(port)
    try:
        if count > 1:
            _wait_ready(int(args[args.index("--http-port") + 1]), count, ctx.timeout)
        sent = ctx.sender.send(
            port, dataset.files, associations, timeout=ctx.timeout, env=SENDER_ENV
        )
    finally:
        service.stop()
    if sent.succeeded != dataset.count:
        raise RuntimeError(
            f"{system}: {sent.succeeded}/{dataset.count} stored\n{sent.output[-1500:]}"
            f"\n{service.log_tail()}"
        )
    shutil.rmtree(workdir, ignore_errors=True)
    return sent.seconds


def _wait_ready(http_port: int, count: int, timeout: float) -> None:
    """Until /readyz names every receiver process of ``--processes count`` ready."""
    wanted = f"{count}/{count} receiver processes"
    deadline = time.monotonic() + min(timeout, 120)
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=5) as r:
                body = json.loads(r.read())
        except (OSError, ValueError, urllib.error.HTTPError):
            body = {}
        detail = body.get("checks", {}).get("receivers", {}).get("detail", "")
        if body.get("ready") and detail == wanted:
            return
        time.sleep(0.1)
    raise TimeoutError(f"--processes {count}: not every receiver process ready")


def targets(rows: list[Row]) -> list[Target]:
    """The issue's targets for receiving on every core, from rows of this run.

    A target counts as met only when it holds in every run (each run's ratio from
    the two systems' times of that run), not only for the medians.
    """
    by = {(r.data, r.system): r for r in rows if r.case == "cores"}
    ours = sorted(
        {r.system for r in rows if r.case == "cores" and r.system.startswith("stowaway")},
        key=lambda s: int(s.rsplit(" ", 1)[1]),
    )
    if not ours:
        return []
    many = ours[-1]
    names = sorted({r.data.split(",")[0] for r in rows if r.case == "cores"})
    out: list[Target] = []

    def add(name: str, fast: Row | None, slow: Row | None, minimum: float) -> None:
        if fast is None or slow is None or not fast.seconds or not slow.seconds:
            out.append(Target(name, None, f">= {minimum:.2f}x", None))
            return
        median = slow.median_seconds / fast.median_seconds
        per_run = [s / f for f, s in zip(fast.seconds, slow.seconds, strict=False)]
        met = all(r >= minimum for r in per_run)
        spread = f"runs {min(per_run):.2f}-{max(per_run):.2f}"
        out.append(Target(name, median, f">= {minimum:.2f}x", met, spread))

    for name in names:
        kind = "small" if name.startswith("small") else "CT"
        minimum = 1.7 if kind == "small" else 1.5
        add(
            f"cores {name}: 4 associations vs 1, {many}",
            by.get((f"{name}, 4 assoc", many)),
            by.get((f"{name}, 1 assoc", many)),
            minimum,
        )
        add(
            f"cores {name}: 4 associations, {many} vs {STORESCP_SYSTEM}",
            by.get((f"{name}, 4 assoc", many)),
            by.get((f"{name}, 4 assoc", STORESCP_SYSTEM)),
            1.0,
        )
    return out
