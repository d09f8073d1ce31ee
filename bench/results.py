"""Rows of the benchmark table, their ratios and the targets, as text and JSON."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Row:
    """One system measured on one case, over several runs."""

    case: str
    data: str
    system: str
    instances: int
    size_bytes: int
    seconds: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    baseline: str | None = None  # the ``key`` of the row this one is compared with
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = None

    @property
    def key(self) -> str:
        return f"{self.case}/{self.data}/{self.system}"

    @property
    def median_seconds(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def instances_per_second(self) -> float:
        return self.instances / self.median_seconds if self.seconds else float("nan")

    @property
    def mb_per_second(self) -> float:
        return self.size_bytes / 1e6 / self.median_seconds if self.seconds else float("nan")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            key=self.key,
            median_seconds=self.median_seconds,
            instances_per_second=self.instances_per_second,
            mb_per_second=self.mb_per_second,
            max_peak_rss_mb=max(self.peak_rss_mb) if self.peak_rss_mb else None,
        )
        return out


@dataclass
class Target:
    """One of the issue's targets, checked against rows of the same run."""

    name: str
    measured: float | None
    wanted: str
    met: bool | None
    detail: str = ""


def fill_ratios(rows: list[Row]) -> None:
    by_key = {r.key: r for r in rows}
    for row in rows:
        base = by_key.get(row.baseline or "")
        if base is not None and base.seconds and row.seconds:
            row.ratio = row.instances_per_second / base.instances_per_second


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}"


def table(rows: list[Row]) -> str:
    """A Markdown table (docs/performance.md uses the same)."""
    lines = [
        "| case | data | system | instances | runs | median s | inst/s | MB/s | peak RSS MB "
        "| ratio | vs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rss = max(r.peak_rss_mb) if r.peak_rss_mb else None
        lines.append(
            f"| {r.case} | {r.data} | {r.system}{' (' + r.note + ')' if r.note else ''} "
            f"| {r.instances} | {len(r.seconds)} | {_fmt(r.median_seconds, 2)} "
            f"| {_fmt(r.instances_per_second)} | {_fmt(r.mb_per_second)} | {_fmt(rss, 0)} "
            f"| {_fmt(r.ratio, 2) + 'x' if r.ratio is not None else '-'} "
            f"| {r.baseline.split('/', 2)[2] if r.baseline else ''} |"
        )
    return "\n".join(lines)


def targets_table(targets: list[Target]) -> str:
    lines = ["| target | wanted | measured | met |", "|---|---|---:|---|"]
    for t in targets:
        met = "-" if t.met is None else ("yes" if t.met else "**no**")
        detail = f" ({t.detail})" if t.detail else ""
        lines.append(f"| {t.name} | {t.wanted} | {_fmt(t.measured, 2)}{detail} | {met} |")
    return "\n".join(lines)
