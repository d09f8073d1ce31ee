"""Every podman call the container tests make: one binary, one configuration, a timeout each.

``CONTAINERS_CONF`` is set to this directory's ``containers.conf`` for each call (runc, no
default ulimits), so the tests work the same from ``.ci/run`` and from a plain ``pytest``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

CONTAINERS_CONF = Path(__file__).with_name("containers.conf")


class PodmanError(RuntimeError):
    """A podman command failed or did not finish in time."""


def podman_binary() -> str | None:
    return shutil.which("podman")


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` with podman's configuration; a timeout or (with ``check``) a non-zero
    exit raises PodmanError carrying the command's output."""
    try:
        result = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**podman_env(), **(env or {})},
            cwd=cwd,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise PodmanError(f"{' '.join(argv[:3])} ... did not finish in {timeout:.0f} s") from exc
    if check and result.returncode != 0:
        raise PodmanError(
            f"{' '.join(argv)} exited {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``podman ARGS``; see :func:`run`."""
    return run(["podman", *args], timeout=timeout, check=check)


def unavailable_reason() -> str | None:
    """Why podman cannot run containers here, or None when it can (as far as ``podman info``
    tells; the first container run is the final word)."""
    if podman_binary() is None:
        return "podman is not installed (apt-get install podman runc)"
    try:
        info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60, check=False)
    except PodmanError as exc:
        return f"podman info: {exc}"
    if info.returncode != 0:
        lines = (info.stderr or info.stdout).strip().splitlines()
        return f"podman cannot run here: {lines[-1] if lines else 'podman info failed'}"
    return None
