"""Fixtures for the container tests: podman, the images, and containers that are always
removed again.

Every test here skips, with podman's own reason, where podman cannot run containers; on a
machine where it can (CI runs as root on the same kind of machine) nothing is optional.
Each container, volume and network a test creates carries this session's label and is
removed at the end of the test, pass or fail; the session sweeps its label once more.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.container.base_images import (
    ORTHANC,
    POSTGRES,
    PYTHON,
    REPO,
    build_stowaway,
    ensure,
)
from tests.container.podman import podman, unavailable_reason
from tests.support.processes import free_port

# Only one xdist worker (or one checkout's session) makes an image at a time; the next
# finds it cached.
BUILD_LOCK = Path("/tmp/stowaway-container-images.lock")
SESSION_LABEL = f"org.stowaway.test.session={uuid.uuid4().hex[:12]}"
# The container reaches the host's loopback (the test Orthanc) at this address, through
# slirp4netns with allow_host_loopback; published ports bind the host's loopback only.
HOST_FROM_CONTAINER = "10.0.2.2"
HOST_LOOPBACK_NETWORK = "slirp4netns:allow_host_loopback=true"
GRACE_PERIOD = 5


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    with BUILD_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def podman_runs() -> Iterator[None]:
    """Skips where podman cannot run a container; removes what the session left behind."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with build_lock():
        ensure(PYTHON)
    probe = podman("run", "--rm", "--label", SESSION_LABEL, PYTHON.tag, "true", check=False)
    if probe.returncode != 0:
        lines = probe.stderr.strip().splitlines()
        pytest.skip(f"podman cannot run a container here: {lines[-1] if lines else '?'}")
    yield
    sweep(SESSION_LABEL)


def sweep(label: str) -> None:
    """Remove every container, pod, volume and network carrying ``label``."""
    found = podman("ps", "-aq", "--filter", f"label={label}", check=False, timeout=30)
    ids = found.stdout.split()
    if ids:
        # -v: with their anonymous volumes (the image's VOLUME /data where none is mounted)
        podman("rm", "-f", "-v", "-t", "0", *ids, check=False, timeout=120)
    volumes = podman("volume", "ls", "-q", "--filter", f"label={label}", check=False, timeout=30)
    if volumes.stdout.split():
        podman("volume", "rm", "-f", *volumes.stdout.split(), check=False, timeout=60)
    pods = podman("pod", "ls", "-q", "--filter", f"label={label}", check=False, timeout=30)
    if pods.stdout.split():
        podman("pod", "rm", "-f", *pods.stdout.split(), check=False, timeout=120)
    networks = podman("network", "ls", "-q", "--filter", f"label={label}", check=False, timeout=30)
    if networks.stdout.split():
        podman("network", "rm", "-f", *networks.stdout.split(), check=False, timeout=60)


@pytest.fixture(scope="session")
def stowaway_image(podman_runs: None) -> str:
    """The repository's Dockerfile, built as it is (one tag per checkout)."""
    checkout = hashlib.sha256(str(REPO).encode()).hexdigest()[:12]
    with build_lock():
        return build_stowaway(f"localhost/stowaway-test/stowaway:{checkout}")


@pytest.fixture(scope="session")
def standin_images(podman_runs: None) -> dict[str, str]:
    """Images that stand in for the compose file's postgres and Orthanc."""
    with build_lock():
        ensure(POSTGRES)
        ensure(ORTHANC)
    return {"postgres": POSTGRES.tag, "orthanc": ORTHANC.tag}


@dataclass
class Container:
    """One ``podman run -d`` container; ``port``/``http_port`` are its published
    2575/8080 on the host's loopback."""

    name: str
    volume: str
    port: int
    http_port: int
    http: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.http.trust_env = False  # no proxy for loopback

    def state(self) -> dict[str, Any]:
        out = podman("inspect", "--format", "{{json .State}}", self.name, timeout=30)
        state: dict[str, Any] = json.loads(out.stdout)
        return state

    def logs(self) -> str:
        out = podman("logs", self.name, check=False, timeout=30)
        return out.stdout + out.stderr

    def get(self, path: str) -> requests.Response:
        return self.http.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=5)

    def wait_answering(self, path: str = "/healthz", timeout: float = 60) -> None:
        """Until ``path`` answers 200 through the published HTTP port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.state().get("Running"):
                raise AssertionError(f"{self.name} exited:\n{self.logs()[-4000:]}")
            with contextlib.suppress(requests.RequestException):
                if self.get(path).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: {path} not answering in {timeout} s\n{self.logs()}")

    def exec(self, *argv: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
        as_user = ["--user", user] if user else []
        return podman("exec", *as_user, self.name, *argv, check=False, timeout=60)

    def wait_exit(self, timeout: float) -> int:
        """The exit code, once the container has stopped within ``timeout`` seconds."""
        out = podman("wait", self.name, timeout=timeout)
        return int(out.stdout.strip().splitlines()[-1])


class Pods:
    """Creates named resources with the session label and removes them at the end."""

    def __init__(self) -> None:
        self.prefix = f"stowaway-test-{uuid.uuid4().hex[:8]}"
        self.test_label = f"org.stowaway.test.case={self.prefix}"
        self.count = 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}-{what}-{self.count}"

    def labels(self) -> list[str]:
        return ["--label", SESSION_LABEL, "--label", self.test_label]

    def volume(self) -> str:
        name = self.name("data")
        podman("volume", "create", *self.labels(), name, timeout=30)
        return name

    def stowaway(
        self, image: str, *args: str, volume: str, extra: tuple[str, ...] = ()
    ) -> Container:
        """``stowaway ARGS`` in a container: /data on ``volume``, 2575 and 8080 published
        on the host's loopback, the host's loopback reachable at HOST_FROM_CONTAINER."""
        container = Container(self.name("stowaway"), volume, free_port(), free_port())
        podman(
            "run",
            "-d",
            "--name",
            container.name,
            *self.labels(),
            "--network",
            HOST_LOOPBACK_NETWORK,
            "-p",
            f"127.0.0.1:{container.port}:2575",
            "-p",
            f"127.0.0.1:{container.http_port}:8080",
            "-v",
            f"{volume}:/data",
            *extra,
            image,
            *args,
            "--min-free-disk",
            "1MiB",
            "--grace-period",
            str(GRACE_PERIOD),
            timeout=60,
        )
        return container

    def remove(self) -> None:
        sweep(self.test_label)


@pytest.fixture
def pods(podman_runs: None) -> Iterator[Pods]:
    made = Pods()
    try:
        yield made
    finally:
        made.remove()
