"""stowaway's benchmark: one command, deterministic data, a table and a JSON file.

    python -m bench                       # everything, 3 runs each (takes a while)
    python -m bench --quick --repeat 1    # tiny data, seconds: the smoke test runs this
    python -m bench --cases ingest,claim --out bench/out/results.json

Cases (see docs/performance.md for what each compares):
ingest, forward, e2e, memory, claim, cores, uplink (bench/wan.py), year (bench/year.py).
Every server listens on 127.0.0.1 and every wait has a deadline (``--timeout``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import cases, cores, wan
from bench.claim import postgres_claim, sqlite_claim
from bench.data import DATA_DIR, instance_set
from bench.procs import Sender
from bench.results import Row, Target, fill_ratios, ratio_runs, table, targets_table
from bench.year import run_year, year_table, year_targets

ALL_CASES = ("ingest", "forward", "e2e", "memory", "claim", "cores", "uplink", "year")
DEFAULT_OUT = Path(__file__).resolve().parent / "out" / "results.json"
DEFAULT_PG = os.environ.get(
    "STOWAWAY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--quick", action="store_true", help="tiny data sets (a smoke run)")
    parser.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated cases")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file")
    parser.add_argument("--ct", type=int, help="CT instances (default 300, quick 20)")
    parser.add_argument("--small", type=int, help="small instances (default 2000, quick 40)")
    parser.add_argument("--huge-mib", type=int, help="memory case size (default 1024, quick 32)")
    parser.add_argument("--claim-rows", type=int, help="claim case rows (default 1000000)")
    parser.add_argument("--year-rows", type=int, help="year case rows (default 10000000)")
    parser.add_argument("--pg-url", default=DEFAULT_PG, help="Postgres for the claim case")
    parser.add_argument("--timeout", type=float, default=900, help="seconds any one step may take")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help="scratch space (default: next to --out)")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    unknown = set(args.cases.split(",")) - set(ALL_CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {ALL_CASES}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def machine() -> dict[str, Any]:
    def first_line(*cmd: str) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
        except OSError:
            return ""
        return out.strip().splitlines()[0] if out.strip() else ""

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dcmtk": first_line("/usr/bin/dcmsend", "--version"),
        "load_average_at_start": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = args.cases.split(",")
    quick = args.quick
    ct_count = args.ct or (20 if quick else 300)
    small_count = args.small or (40 if quick else 2000)
    huge_mib = args.huge_mib or (32 if quick else 1024)
    claim_rows = args.claim_rows or (10_000 if quick else 1_000_000)
    # Absolute: Orthanc and the receivers run in other working directories.
    workdir = (args.workdir or args.out.parent / "work").resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    ctx = cases.Context(workdir, args.repeat, args.timeout, Sender(workdir), log, quick)
    try:
        return run_cases(args, ctx, selected, ct_count, small_count, huge_mib, claim_rows)
    finally:
        ctx.close()
        shutil.rmtree(workdir, ignore_errors=True)


def run_cases(
    args: argparse.Namespace,
    ctx: cases.Context,
    selected: list[str],
    ct_count: int,
    small_count: int,
    huge_mib: int,
    claim_rows: int,
) -> int:
    log = ctx.log
    workdir = ctx.workdir
    info = machine()
    log(f"machine: {info}")
    started = time.time()
    log("generating data (cached in bench/data)...")
    ct = instance_set("ct", ct_count, ct_count, args.data_dir)
    small = instance_set("small", small_count, max(1, small_count // 10), args.data_dir)
    rows: list[Row] = []
    claims: list[dict[str, Any]] = []
    systems = list(cases.RECEIVERS)

    if "ingest" in selected:
        for dataset in (ct, small):
            log(f"ingest {dataset.name}, 1 sender")
            rows += cases.ingest(ctx, dataset, 1, systems)
            log(f"ingest {dataset.name}, 4 senders")
            rows += cases.ingest(ctx, dataset, 4, systems[:1] if args.quick else systems[:2])
    if "forward" in selected:
        for dataset in (ct, small):
            log(f"forward {dataset.name}")
            rows += cases.forward(ctx, dataset, [1, 10] if args.quick else [1, 5, 10, 20])
    if "e2e" in selected:
        log(f"end to end {ct.name}")
        rows += cases.end_to_end(
            ctx, ct, _find(rows, "ingest", f"{ct.name}, 1 sender", "stowaway receive")
        )
    if "memory" in selected:
        log(f"memory, {huge_mib} MiB instance")
        rows += cases.memory(ctx, huge_mib * 2**20)
    if "cores" in selected:
        log("cores: 1, 4 and 8 associations, one receiver process and N")
        rows += cores.cores(ctx, [small, ct], quick=args.quick)
    if "claim" in selected:
        log(f"claim, {claim_rows:,} pending rows")
        claims.append(sqlite_claim(workdir, claim_rows, 50).to_json())
        claims.append(postgres_claim(args.pg_url, claim_rows, 50).to_json())
    year_rows = args.year_rows or (20_000 if args.quick else 10_000_000)
    years = []
    if "year" in selected:
        years = run_year(workdir, args.pg_url, year_rows, args.timeout, log)

    extra_targets: list[Target] = []
    if "uplink" in selected:
        found, extra_targets = wan.uplink(
            ctx, {"datacenter": 4} if args.quick else wan.CT_PER_PROFILE,
            16 if args.quick else 800, args.data_dir, args.quick,
        )  # fmt: skip
        rows += found

    fill_ratios(rows)
    targets = (
        check_targets(rows, claims, ct.name, small.name)
        + cores.targets(rows)
        + extra_targets
        + year_targets(years)
    )
    report = {
        "command": "python -m bench " + " ".join(args.argv),
        "machine": info,
        "load_average_at_end": os.getloadavg(),
        "seconds": time.time() - started,
        "rows": [r.to_json() for r in rows],
        "claim": claims,
        "year": years,
        "targets": [t.__dict__ for t in targets],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(table(rows))
    if claims:
        print()
        print(claim_table(claims))
    if years:
        print("\n" + year_table(years))
    print()
    print(targets_table(targets))
    print(
        f"\nload average at start {info['load_average_at_start']}, "
        f"at end {report['load_average_at_end']}; results in {args.out}"
    )
    return 0


def claim_table(claims: list[dict[str, Any]]) -> str:
    lines = [
        "| database | pending rows | bulk insert s | claims | median ms | p95 ms | max ms "
        "| statements only, median ms | 4 KiB fsync, median ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in claims:
        lines.append(
            f"| {c['database']} | {c['rows']:,} | {c['insert_seconds']:.1f} | {c['claims']} "
            f"| {c['median_ms']:.2f} | {c['p95_ms']:.2f} | {c['max_ms']:.2f} "
            f"| {c['statement_median_ms']:.2f} | {c['fsync_median_ms']:.2f} |"
        )
    for c in claims:
        for branch, plan in c["plans"].items():
            lines.append(f"\n{c['database']} plan, claim `{branch}`:\n```\n{plan}\n```")
    return "\n".join(lines)


def _find(rows: list[Row], case: str, data: str, system: str) -> Row | None:
    for row in rows:
        if (row.case, row.data, row.system) == (case, data, system):
            return row
    return None


def _ratio(a: Row | None, b: Row | None) -> float | None:
    if a is None or b is None or not a.seconds or not b.seconds:
        return None
    return a.instances_per_second / b.instances_per_second


def check_targets(
    rows: list[Row], claims: list[dict[str, Any]], ct: str, small: str
) -> list[Target]:
    """The issue's targets, each from rows measured in this run."""
    out: list[Target] = []

    def add(name: str, runs: list[float], minimum: float, detail: str = "") -> None:
        """A ratio target, met when the worst run's ratio reaches ``minimum``."""
        out.append(Target.at_least(name, runs, minimum, detail))

    ours = "stowaway receive"
    for data, minimum in ((ct, 1.0), (small, 0.8)):
        one = f"{data}, 1 sender"
        add(
            f"ingest {data}, 1 association, vs bare pynetdicom",
            ratio_runs(
                _find(rows, "ingest", one, ours), _find(rows, "ingest", one, "bare pynetdicom")
            ),
            minimum,
        )
    for data in (ct, small):
        add(
            f"ingest {data}, 4 associations vs 1 (aggregate)",
            ratio_runs(
                _find(rows, "ingest", f"{data}, 4 senders", ours),
                _find(rows, "ingest", f"{data}, 1 sender", ours),
            ),
            1.0,
        )
    for data in (ct, small):
        one = f"{data}, 1 sender"
        dcmtk = [_find(rows, "ingest", one, s) for s in ("storescp", "storescp TCP_NODELAY=1")]
        found = [d for d in dcmtk if d is not None and d.seconds]
        fastest = max(found, key=lambda r: r.instances_per_second) if found else None
        add(
            f"ingest {data}, 1 association, vs the faster storescp",
            ratio_runs(_find(rows, "ingest", one, ours), fastest),
            1.0,
            fastest.system if fastest else "",
        )
    for data in (ct, small):
        add(
            f"forward {data} vs the best POST loop",
            ratio_runs(
                _find(rows, "forward", data, "stowaway forward"),
                _find(rows, "forward", data, "POST loop, best batch"),
            ),
            0.9,
        )
    add(
        f"serve {ct}: sender's rate vs ingest only",
        ratio_runs(
            _find(rows, "e2e", ct, "stowaway serve, sender's view"),
            _find(rows, "ingest", f"{ct}, 1 sender", ours),
        ),
        0.8,
    )
    for row in rows:
        if row.case == "memory" and row.peak_rss_mb:
            out.append(
                Target.at_most(
                    f"peak RSS, {row.system}, {row.data}", row.peak_rss_mb, 200, "MB", " MB"
                )
            )
    for c in claims:
        out.append(
            Target(
                f"claim latency, {c['database']}, {c['rows']:,} pending",
                c["p95_ms"],
                "< 5 ms",
                c["p95_ms"] < 5,
                "p95 ms",
            )
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
