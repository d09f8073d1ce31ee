"""Run Python code in a child process and report its peak resident set size.

The peak is the child's own ``VmHWM`` (``/proc/self/status``), read by the child at its end:
``getrusage``/``wait4`` would report the parent's RSS for a child started by fork or vfork,
because Linux carries the high-water mark across ``exec``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["run_with_peak_rss"]

_REPORT = """
with open("/proc/self/status") as _status:
    for _line in _status:
        if _line.startswith("VmHWM:"):
            print("VmHWM", _line.split()[1])
"""


def run_with_peak_rss(
    code: str, *args: str, cwd: Path, timeout: float = 120
) -> tuple[list[str], int]:
    """Run ``code`` with ``args`` as ``sys.argv[1:]``; returns (stdout lines, peak bytes).

    Raises AssertionError with the child's stderr if it fails.
    """
    run = subprocess.run(
        [sys.executable, "-c", code + "\n" + _REPORT, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    label, kilobytes = lines[-1].split()
    assert label == "VmHWM"
    return lines[:-1], int(kilobytes) * 1024
