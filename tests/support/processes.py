"""Start stowaway as a real process, and the DCMTK tools that talk to it.

The port and stop helpers here are also the benchmark's (``bench/procs.py``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# pynetdicom installs console scripts with DCMTK's names; always use DCMTK's.
DCMSEND = "/usr/bin/dcmsend"
STORESCP_BINARY = "/usr/bin/storescp"
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


def terminate(proc: subprocess.Popen[Any], timeout: float) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; returns the exit code.

    A process that has already gone (or is reaped meanwhile) is not an error.
    """
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
    return proc.returncode


@dataclass
class StowawayProcess:
    """A running ``stowaway`` subcommand; its log goes to ``log_path``."""

    args: list[str]
    data_dir: Path
    db_url: str
    port: int
    http_port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_port: bool = True) -> StowawayProcess:
        env = {**os.environ, **self.env}
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stowaway.cli", *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        if wait_port:
            wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL: the crash tests' weapon."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run another stowaway subcommand against the same data."""
        return run_cli(
            *args,
            "--data-dir",
            str(self.data_dir),
            "--db-url",
            self.db_url,
            check=check,
            env=self.env,
        )


def run_cli(
    *args: str, check: bool = True, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "stowaway.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if check and result.returncode != 0:
        command = " ".join(args)
        output = f"{result.stdout}\n{result.stderr}"
        raise AssertionError(f"stowaway {command} exited {result.returncode}\n{output}")
    return result


def dcmsend(
    port: int, files: Sequence[Path], aec: str = "IMPORTADAPTER", *extra: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DCMSEND, "-v", "127.0.0.1", str(port), *map(str, files), "-aec", aec, *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def storescp(directory: Path, aet: str, *options: str) -> Iterator[int]:
    """DCMTK's storescp on a free loopback port as a DICOM destination, writing what it
    receives into ``directory``; yields its port. ``options``: more storescp options
    (``+xa``: accept every transfer syntax it knows, compressed ones too)."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            STORESCP_BINARY,
            "--aetitle",
            aet,
            "--output-directory",
            str(directory),
            *options,
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
