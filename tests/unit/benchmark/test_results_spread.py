"""The benchmark's table reports every run, and a target holds only when every run meets it."""

from __future__ import annotations

from bench.results import Row, Target, fill_ratios, ratio_runs, table, targets_table


def _row(system: str, seconds: list[float], baseline: Row | None = None) -> Row:
    row = Row("case", "data", system, 100, 1000, seconds=seconds)
    row.baseline = baseline.key if baseline else None
    return row


def test_ratios_pair_runs_by_index_and_report_their_spread() -> None:
    base = _row("base", [1.0, 2.0, 1.0])
    ours = _row("ours", [0.5, 1.0, 2.0], base)
    fill_ratios([ours, base])
    assert ours.ratios == [2.0, 2.0, 0.5]
    assert ours.ratio == 2.0
    text = table([ours, base])
    assert "2.00x (0.50-2.00)" in text
    assert "200.0, 100.0, 50.0" in text  # every run's rate


def test_a_target_is_met_only_when_its_worst_run_meets_it() -> None:
    base = _row("base", [1.0, 1.0, 1.0])
    ours = _row("ours", [0.5, 0.5, 2.0], base)
    target = Target.at_least("t", ratio_runs(ours, base), 1.0)
    assert target.measured == 2.0  # the median passes...
    assert target.met is False  # ...but one run does not
    assert Target.at_least("t", [1.1, 1.0, 1.3], 1.0).met is True
    assert Target.at_most("rss", [150, 210], 200).met is False
    assert "| **no** |" in targets_table([target])
    assert Target.at_least("none", [], 1.0).met is None


def test_targets_built_the_old_way_still_print() -> None:
    old = Target("claim", 1.2, "< 5 ms", True, "p95 ms")
    assert "| claim | < 5 ms | 1.20 (p95 ms) | - | yes |" in targets_table([old])
