"""Rows of the benchmark table, their ratios and the targets, as text and JSON.

The machine the benchmark runs on is shared and noisy: rates of the same
system move by tens of percent between runs. So every row keeps each run, a
ratio is computed run by run (run *i* of a system against run *i* of its
baseline: the systems of a case take turns, so the two met the same moment of
the machine), and shown as its median with the spread (min-max). A target is
met only when it holds for every run: for "at least", the worst (smallest)
run's ratio; for "at most", the largest.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
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
    #: median of ``ratios`` (set by :func:`fill_ratios`)
    ratio: float | None = None
    #: this row's rate over its baseline's, run by run (set by :func:`fill_ratios`)
    ratios: list[float] = field(default_factory=list)

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

    @property
    def run_rates(self) -> list[float]:
        """Instances per second of each run, in run order."""
        return [self.instances / s if s > 0 else float("inf") for s in self.seconds]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            key=self.key,
            median_seconds=self.median_seconds,
            instances_per_second=self.instances_per_second,
            mb_per_second=self.mb_per_second,
            max_peak_rss_mb=max(self.peak_rss_mb) if self.peak_rss_mb else None,
            run_instances_per_second=self.run_rates,
            ratio_spread=spread(self.ratios),
        )
        return out


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """``{"min", "median", "max"}`` of ``values`` (None when there are none)."""
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def ratio_runs(a: Row | None, b: Row | None) -> list[float]:
    """``a``'s rate over ``b``'s, run by run.

    Runs are paired by index when both rows have the same number of runs (the
    cases interleave their systems run by run); otherwise each run of ``a`` is
    compared with ``b``'s median.
    """
    if a is None or b is None or not a.seconds or not b.seconds:
        return []
    rates, base = a.run_rates, b.run_rates
    if len(rates) == len(base):
        return [r / q for r, q in zip(rates, base, strict=True)]
    return [r / b.instances_per_second for r in rates]


@dataclass
class Target:
    """One of the issue's targets, checked against rows of the same run.

    ``measured`` is the median; ``runs`` holds every run's value (empty when
    the figure is not measured run by run). Build one with :meth:`at_least`
    or :meth:`at_most` to have ``met`` decided over every run.
    """

    name: str
    measured: float | None
    wanted: str
    met: bool | None
    detail: str = ""
    runs: list[float] = field(default_factory=list)

    @classmethod
    def at_least(
        cls, name: str, runs: Sequence[float], minimum: float, detail: str = "", unit: str = "x"
    ) -> Target:
        """Met when the worst run reaches ``minimum``."""
        values = list(runs)
        measured = statistics.median(values) if values else None
        met = min(values) >= minimum if values else None
        return cls(name, measured, f">= {minimum:g}{unit}", met, detail, values)

    @classmethod
    def at_most(
        cls, name: str, runs: Sequence[float], maximum: float, detail: str = "", unit: str = ""
    ) -> Target:
        """Met when the largest run stays below ``maximum``."""
        values = list(runs)
        measured = statistics.median(values) if values else None
        met = max(values) < maximum if values else None
        return cls(name, measured, f"< {maximum:g}{unit}", met, detail, values)


def fill_ratios(rows: list[Row]) -> None:
    by_key = {r.key: r for r in rows}
    for row in rows:
        base = by_key.get(row.baseline or "")
        row.ratios = ratio_runs(row, base)
        row.ratio = statistics.median(row.ratios) if row.ratios else None


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}"


def _spread_text(values: Sequence[float], digits: int = 2, unit: str = "") -> str:
    """``median unit (min-max)``, or the one value when there is one run."""
    got = spread(values)
    if got is None:
        return "-"
    text = f"{_fmt(got['median'], digits)}{unit}"
    if len(values) > 1:
        text += f" ({_fmt(got['min'], digits)}-{_fmt(got['max'], digits)})"
    return text


def table(rows: list[Row]) -> str:
    """A Markdown table (docs/performance.md uses the same).

    ``inst/s`` is the median run's rate, ``runs inst/s`` every run's;
    ``ratio`` is the median of the run-by-run ratios with their min-max.
    """
    lines = [
        "| case | data | system | instances | runs | median s | inst/s | runs inst/s | MB/s "
        "| peak RSS MB | ratio (min-max) | vs |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        rss = max(r.peak_rss_mb) if r.peak_rss_mb else None
        each = ", ".join(_fmt(v) for v in r.run_rates)
        lines.append(
            f"| {r.case} | {r.data} | {r.system}{' (' + r.note + ')' if r.note else ''} "
            f"| {r.instances} | {len(r.seconds)} | {_fmt(r.median_seconds, 2)} "
            f"| {_fmt(r.instances_per_second)} | {each or '-'} | {_fmt(r.mb_per_second)} "
            f"| {_fmt(rss, 0)} | {_spread_text(r.ratios, unit='x')} "
            f"| {r.baseline.split('/', 2)[2] if r.baseline else ''} |"
        )
    return "\n".join(lines)


def targets_table(targets: list[Target]) -> str:
    """The targets; ``measured`` is the median (min-max over the runs), met over every run."""
    lines = [
        "| target | wanted | measured, median (min-max) | runs | met (every run) |",
        "|---|---|---:|---:|---|",
    ]
    for t in targets:
        met = "-" if t.met is None else ("yes" if t.met else "**no**")
        detail = f" ({t.detail})" if t.detail else ""
        shown = _spread_text(t.runs) if t.runs else _fmt(t.measured, 2)
        lines.append(f"| {t.name} | {t.wanted} | {shown}{detail} | {len(t.runs) or '-'} | {met} |")
    return "\n".join(lines)
