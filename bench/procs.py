"""Processes the benchmark starts: receivers, senders, forwarders; their timing and memory.

Everything listens on 127.0.0.1 only, and every wait has a deadline. Ports, the wait
for a listener and the SIGTERM-then-SIGKILL stop are the tests' (``tests/support``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.processes import DCMSEND, terminate, wait_for_port

# pynetdicom's console scripts shadow DCMTK's names in PATH: always full paths.
STORESCP = "/usr/bin/storescp"
REPO = Path(__file__).resolve().parent.parent

# dcmsend's log lines with a timestamp (seconds.milliseconds), so the span from
# the first C-STORE request to the last response excludes the sender's file scan.
_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%q} %m%n
"""


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set (VmHWM) in MiB, while it is still running."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Service:
    """A long-running child process (receiver, forwarder, server) with its log in a file."""

    def __init__(
        self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.peak_rss_mb: float | None = None

    def start(self, port: int | None = None) -> Service:
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
                start_new_session=True,
            )
        finally:
            log.close()
        if port is not None:
            wait_for_port(port, timeout=30.0, proc=self.proc)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def sample_rss(self) -> float | None:
        """Record the peak RSS so far (call before ``stop``)."""
        if self.proc is not None and self.proc.poll() is None:
            self.peak_rss_mb = peak_rss_mb(self.proc.pid)
        return self.peak_rss_mb

    def stop(self, timeout: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self.peak_rss_mb = peak_rss_mb(proc.pid) or self.peak_rss_mb
        terminate(proc, timeout)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


@dataclass(frozen=True)
class SendResult:
    """One dcmsend run, timed from its first C-STORE request to its last response."""

    first_request: float
    last_response: float
    succeeded: int
    failed: int
    returncode: int
    output: str

    @property
    def seconds(self) -> float:
        return self.last_response - self.first_request


class Sender:
    """``/usr/bin/dcmsend`` with default network settings (16 KiB PDUs, Nagle as DCMTK sets it)."""

    def __init__(self, workdir: Path) -> None:
        self.config = workdir / "dcmsend-log.cfg"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(_LOG_CONFIG)

    def start(
        self, port: int, files: Sequence[Path], env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        args = [DCMSEND, "-lc", str(self.config), "127.0.0.1", str(port), *map(str, files)]
        args += ["-aec", "IMPORTADAPTER", "-aet", "BENCH", "-to", "10", "-td", "120"]
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )

    @staticmethod
    def finish(proc: subprocess.Popen[str], timeout: float) -> SendResult:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
            raise TimeoutError(f"dcmsend did not finish within {timeout} s") from None
        requests = [_stamp(line) for line in output.splitlines() if "Sending C-STORE" in line]
        responses = [_stamp(line) for line in output.splitlines() if "Received C-STORE" in line]
        succeeded = sum(
            "Received C-STORE Response (Success)" in line for line in output.splitlines()
        )
        if not requests or not responses:
            raise RuntimeError(f"dcmsend sent nothing (exit {proc.returncode}):\n{output[-2000:]}")
        return SendResult(
            min(requests),
            max(responses),
            succeeded,
            len(responses) - succeeded,
            proc.returncode,
            output,
        )

    def send(
        self,
        port: int,
        files: Sequence[Path],
        senders: int = 1,
        timeout: float = 600,
        env: dict[str, str] | None = None,
    ) -> SendResult:
        """Send ``files`` over ``senders`` concurrent associations (one dcmsend each)."""
        parts = [list(files[i::senders]) for i in range(senders)]
        procs = [self.start(port, part, env) for part in parts if part]
        results = [self.finish(p, timeout) for p in procs]
        return SendResult(
            min(r.first_request for r in results),
            max(r.last_response for r in results),
            sum(r.succeeded for r in results),
            sum(r.failed for r in results),
            max(r.returncode for r in results),
            "\n".join(r.output[-1000:] for r in results),
        )


def _stamp(line: str) -> float:
    return float(line.split(" ", 1)[0])
