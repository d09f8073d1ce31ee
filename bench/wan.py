"""Case ``uplink``: forwarding over an emulated uplink (``bench/uplink.py``) into Orthanc.

Per profile (clinic, hospital, datacenter: bandwidth, round trip, and 150 ms
of service time per request at the destination), a CT study and small
instances of 8 studies arriving interleaved are drained from a full queue by:

* ``stowaway forward`` with its defaults (adaptive concurrency);
* the same forwarder at each fixed ``--workers`` x ``--batch-max-instances`` of a
  sweep, and the fastest of them in each run ("best swept");
* a Google-adapter-style client: one instance per request, one request at a
  time (``bench/baselines/post_loop.py --batch 1``), on the first
  ``GOOGLE_SAMPLE`` instances only: a client that sends one by one has the
  same rate on 80 instances as on 800, and the whole set would take minutes.

Then a 429 storm: the defaults forwarding the small set through the clinic
link to a destination answering 429 with Retry-After for a while
(``bench/sink.py --throttle-seconds``), counting its requests per second.

One Orthanc serves the whole case, emptied before each run.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from bench.cases import Context, filled_queue, post_loop, stowaway_args, wait_forwarded
from bench.data import InstanceSet, instance_set
from bench.procs import REPO, Service, python
from bench.results import Row, Target, ratio_runs
from bench.uplink import PROFILES, Profile
from tests.support.orthanc import OrthancServer
from tests.support.processes import free_port

CASE = "uplink"
STUDIES = 8
SWEEP = [(w, b) for w in (1, 4, 16) for b in (10, 50)]
QUICK_SWEEP = [(4, 10)]
GOOGLE_SAMPLE = {"ct": 20, "small": 80}
#: CT instances per profile: about 8 s of the link's time on the clinic link, 6 s on
#: the hospital one (a 40-instance study, 21 MB, is under a second there: the last
#: request's service time and round trip would be what is measured, not the link)
CT_PER_PROFILE = {"clinic": 40, "hospital": 300, "datacenter": 300}
DEFAULTS = (
    "defaults: --workers 4, --max-workers 16, --batch-max-instances 50, --batch-max-bytes 8MiB"
)
GOOGLE = "Google-style: 1 instance per request, 1 at a time"
BEST = "best swept"
#: the 429 storm: how long the destination throttles, and the Retry-After it gives
STORM_SECONDS, STORM_RETRY_AFTER = 10.0, 2


def datasets(ctx: Context, ct_count: int, small_count: int, data_dir: Path) -> list[InstanceSet]:
    """One CT study, and small instances of ``STUDIES`` studies in interleaved order."""
    ct = instance_set("ct", ct_count, ct_count, data_dir)
    small = instance_set("small", small_count, max(1, small_count // STUDIES), data_dir)
    per = max(1, small_count // STUDIES)
    order = sorted(range(small.count), key=lambda i: (i % per, i // per))
    mixed = replace(small, name=f"{small.name}x{STUDIES}", files=[small.files[i] for i in order])
    return [ct, mixed]


def uplink(
    ctx: Context,
    ct_counts: Mapping[str, int],
    small_count: int,
    data_dir: Path,
    quick: bool,
) -> tuple[list[Row], list[Target]]:
    """Each profile of ``ct_counts`` with its CT study of that many instances (a study
    whose transfer outlasts a request's fixed cost many times, so that the link's
    bandwidth is what is measured) and the interleaved small set."""
    rows: list[Row] = []
    targets: list[Target] = []
    sets = {
        count: datasets(ctx, count, small_count, data_dir / "uplink")
        for count in sorted(set(ct_counts.values()))
    }
    small = next(iter(sets.values()))[1]
    sweep = QUICK_SWEEP if quick else SWEEP
    with one_orthanc(ctx) as server:
        for ct, _small in sets.values():
            rows.append(_loopback_row(ctx, server, ct))
        rows.append(_loopback_row(ctx, server, small))
        for name, count in ct_counts.items():
            profile = PROFILES[name]
            with link(ctx, profile, server.http_port) as url:
                for dataset in sets[count]:
                    ctx.log(f"uplink {profile.name} {dataset.name}")
                    found = _profile_rows(ctx, server, url, profile, dataset, sweep)
                    rows += found
                    targets += _targets(profile, dataset, found)
        ctx.log("uplink 429 storm")
        storm_rows, storm_targets = storm(ctx, small, quick)
    return rows + storm_rows, targets + storm_targets


def _profile_rows(
    ctx: Context,
    server: OrthancServer,
    url: str,
    profile: Profile,
    dataset: InstanceSet,
    sweep: list[tuple[int, int]],
) -> list[Row]:
    data = f"{dataset.name}, {profile.name} ({profile.mbit:g} Mbps, {profile.rtt_ms:g} ms RTT)"
    template = filled_queue(ctx, dataset)

    def row(system: str, instances: int | None = None, size: int | None = None) -> Row:
        count = dataset.count if instances is None else instances
        return Row(CASE, data, system, count, dataset.total_bytes if size is None else size)

    ours = row(f"stowaway forward ({DEFAULTS})")
    swept = {s: row(f"stowaway forward, fixed {s[0]} workers x batch {s[1]}") for s in sweep}
    best = row(f"stowaway forward, {BEST}")
    sample = dataset.files[: GOOGLE_SAMPLE["ct" if dataset.name.startswith("ct") else "small"]]
    google = row(GOOGLE, len(sample), sum(p.stat().st_size for p in sample))
    listing = ctx.workdir / f"uplink-files-{dataset.name}.txt"
    listing.write_text("\n".join(map(str, sample)))
    for run in range(ctx.repeat):
        seconds = _forward(ctx, server, url, template, dataset.count, [])
        ours.seconds.append(seconds)
        ctx.log(f"  {profile.name} {dataset.name} defaults: run {run + 1} {seconds:.2f} s")
        fastest: float | None = None
        for workers, batch in sweep:
            fixed = ["--workers", str(workers), "--max-workers", str(workers)]
            fixed += ["--batch-max-instances", str(batch)]
            took = _forward(ctx, server, url, template, dataset.count, fixed)
            swept[(workers, batch)].seconds.append(took)
            fastest = took if fastest is None else min(fastest, took)
            ctx.log(f"  {profile.name} {dataset.name} {workers}x{batch}: {took:.2f} s")
        assert fastest is not None
        best.seconds.append(fastest)
        server.reset()
        took = post_loop(ctx, url, 1, listing)
        _check(server, len(sample))
        google.seconds.append(took)
        ctx.log(f"  {profile.name} {dataset.name} Google-style ({len(sample)}): {took:.2f} s")
    best.note = "fastest fixed setting of each run"
    google.note = f"first {len(sample)} instances"
    for other in [ours, *swept.values(), google]:
        other.baseline = best.key
    return [ours, best, google, *swept.values()]


def _loopback_row(ctx: Context, server: OrthancServer, dataset: InstanceSet) -> Row:
    """The defaults straight into Orthanc: what this machine manages without a link."""
    row = Row(CASE, f"{dataset.name}, loopback", f"stowaway forward ({DEFAULTS})", 0, 0)
    row.instances, row.size_bytes = dataset.count, dataset.total_bytes
    row.note = "no link emulation: the ceiling of Orthanc and stowaway on this machine"
    template = filled_queue(ctx, dataset)
    for run in range(ctx.repeat):
        took = _forward(ctx, server, server.dicomweb_url, template, dataset.count, [])
        row.seconds.append(took)
        ctx.log(f"  loopback {dataset.name}: run {run + 1} {took:.2f} s")
    return row


def _forward(
    ctx: Context,
    server: OrthancServer,
    url: str,
    template: Path,
    count: int,
    extra: list[str],
) -> float:
    """Drain a copy of ``template`` into ``url``; seconds from first claim to last done."""
    server.reset()
    data_dir = ctx.fresh("uplink-data")
    shutil.rmtree(data_dir)
    shutil.copytree(template, data_dir)
    args = stowaway_args("forward", data_dir, None, "--dicomweb-url", url, *extra)
    with Service(args, ctx.workdir / "uplink-forward.log").start() as service:
        first, last = wait_forwarded(data_dir, count, ctx.timeout, service)
    _check(server, count)
    shutil.rmtree(data_dir, ignore_errors=True)
    return last - first


def _check(server: OrthancServer, count: int) -> None:
    stored = server.count()
    if stored != count:
        raise RuntimeError(f"Orthanc holds {stored} instances, expected {count}")


def _targets(profile: Profile, dataset: InstanceSet, rows: list[Row]) -> list[Target]:
    ours, best, google = rows[0], rows[1], rows[2]
    where = f"uplink {profile.name}, {dataset.name}"
    if dataset.name.startswith("ct"):
        link_share = [dataset.total_bytes / s / profile.bytes_per_second for s in ours.seconds]
        return [
            Target.at_least(
                f"{where}: defaults vs the link's bandwidth",
                link_share,
                0.9,
                f"link {profile.bytes_per_second / 1e6:g} MB/s",
            )
        ]
    return [
        Target.at_least(f"{where}: defaults vs the best swept", ratio_runs(ours, best), 0.9),
        Target.at_least(f"{where}: defaults vs Google-style", ratio_runs(ours, google), 50),
    ]


@contextmanager
def one_orthanc(ctx: Context) -> Iterator[OrthancServer]:
    workdir = ctx.fresh("uplink-orthanc")
    server = OrthancServer(workdir, startup_timeout=60).start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def link(ctx: Context, profile: Profile, target_port: int) -> Iterator[str]:
    """The emulated uplink in front of ``target_port``; yields the DICOMweb URL through it."""
    port = free_port()
    args = python(str(REPO / "bench/uplink.py"), "--port", str(port))
    args += ["--target-port", str(target_port), *profile.args()]
    with Service(args, ctx.workdir / f"uplink-{profile.name}.log").start(port):
        yield f"http://127.0.0.1:{port}/dicom-web"


def storm(ctx: Context, dataset: InstanceSet, quick: bool) -> tuple[list[Row], list[Target]]:
    """The defaults against a destination answering 429 with Retry-After for a while."""
    seconds, retry_after = (3.0, 1) if quick else (STORM_SECONDS, STORM_RETRY_AFTER)
    profile = PROFILES["clinic"]
    template = filled_queue(ctx, dataset)
    data = f"{dataset.name}, clinic, 429 with Retry-After {retry_after} s for {seconds:g} s"
    row = Row(CASE, data, f"stowaway forward ({DEFAULTS})", dataset.count, dataset.total_bytes)
    rates: list[float] = []
    for run in range(ctx.repeat):
        sink_port = free_port()
        sink_log = ctx.workdir / "uplink-storm-sink.log"
        sink_log.unlink(missing_ok=True)
        sink_args = python(str(REPO / "bench/sink.py"), "--port", str(sink_port))
        sink_args += ["--throttle-seconds", str(seconds), "--retry-after", str(retry_after)]
        with (
            Service(sink_args, sink_log).start(sink_port),
            link(ctx, profile, sink_port) as url,
        ):
            data_dir = ctx.fresh("uplink-storm-data")
            shutil.rmtree(data_dir)
            shutil.copytree(template, data_dir)
            args = stowaway_args("forward", data_dir, None, "--dicomweb-url", url)
            args += ["--backoff-max", "60s"]
            with Service(args, ctx.workdir / "uplink-storm.log").start() as service:
                first, last = wait_forwarded(data_dir, dataset.count, ctx.timeout, service)
        posts = [line.split() for line in sink_log.read_text().splitlines()]
        posts = [p for p in posts if len(p) == 3 and p[0] == "post"]
        throttled = [float(p[1]) for p in posts if p[2] == "429"]
        start = min(float(p[1]) for p in posts)
        # Requests after the first Retry-After: the ones in flight when the first
        # 429 came back were sent before the forwarder could know.
        later = [t for t in throttled if t >= start + retry_after]
        rate = len(later) / (seconds - retry_after)
        rates.append(rate)
        row.seconds.append(last - first)
        row.extra.setdefault("requests_during_storm", []).append(len(throttled))
        row.extra.setdefault("requests_per_second_during_storm", []).append(rate)
        row.extra.setdefault("first_after_storm_s", []).append(
            min((float(p[1]) - start - seconds for p in posts if p[2] == "200"), default=None)
        )
        ctx.log(
            f"  storm run {run + 1}: {len(throttled)} requests in {seconds:g} s, "
            f"{len(later)} after the first {retry_after} s"
        )
        shutil.rmtree(data_dir, ignore_errors=True)
    row.note = (
        f"requests during the storm: {row.extra['requests_during_storm']}; per second after "
        f"the first Retry-After: {', '.join(f'{r:.2f}' for r in rates)}"
    )
    target = Target.at_most(
        "uplink 429 storm: requests/s after the first Retry-After",
        rates,
        1.0 / retry_after + 0.01,
        f"at most one per Retry-After ({retry_after} s)",
        " (one per Retry-After)",
    )
    return [row], [target]
