"""docker-compose.yml brought up with podman-compose: the stowaway image built from the
Dockerfile, postgres and Orthanc stand-ins made from Debian's packages, an instance sent
to the published DICOM port and seen in the stack's Orthanc, then the stack brought down.

What these machines cannot do, and how the test stands in for it: podman 4.3 runs health
checks from systemd timers, and there is no systemd here, so no container ever becomes
``healthy`` by itself; and Debian's podman-compose (1.0.3) does not wait for ``depends_on``
conditions at all. So the test starts the services one at a time in the order their
``depends_on`` gives, and waits for each condition itself: ``service_healthy`` by running
the service's own health check (``podman healthcheck run``) until it passes,
``service_completed_successfully`` by ``podman wait``. Everything else is the compose file
as it is, with its variables set to the local images and loopback ports.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.container.base_images import REPO
from tests.container.conftest import sweep
from tests.container.podman import PodmanError, podman, run
from tests.support.dicom_files import make_study, read_uids
from tests.support.processes import dcmsend, free_port

pytestmark = pytest.mark.timeout(600)

COMPOSE_FILE = REPO / "docker-compose.yml"
PODMAN_COMPOSE = shutil.which("podman-compose")
UP_TIMEOUT = 120
CONDITION_TIMEOUT = 90


def depends_on(compose: dict[str, Any]) -> dict[str, dict[str, str]]:
    """service -> {dependency: condition}."""
    return {
        name: {dep: spec["condition"] for dep, spec in svc.get("depends_on", {}).items()}
        for name, svc in compose["services"].items()
    }


class Stack:
    """One podman-compose project of docker-compose.yml, on its own name and ports."""

    def __init__(self, variables: dict[str, str]) -> None:
        self.project = f"stowawaytest{uuid.uuid4().hex[:8]}"
        self.variables = variables
        with COMPOSE_FILE.open() as f:
            self.order = depends_on(yaml.safe_load(f))

    def compose(self, *args: str, timeout: float = UP_TIMEOUT) -> str:
        assert PODMAN_COMPOSE is not None
        done = run(
            [PODMAN_COMPOSE, "-p", self.project, "-f", str(COMPOSE_FILE), *args],
            timeout=timeout,
            env=self.variables,
            cwd=REPO,
        )
        return done.stdout

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def up(self) -> None:
        for service in TopologicalSorter(self.order).static_order():
            for dependency, condition in self.order[service].items():
                self.wait_for(dependency, condition)
            self.compose("up", "-d", "--no-build", service)

    def wait_for(self, service: str, condition: str) -> None:
        name = self.container(service)
        if condition == "service_completed_successfully":
            code = podman("wait", name, timeout=CONDITION_TIMEOUT).stdout.split()[-1]
            assert code == "0", f"{service} exited {code}:\n{self.logs(service)}"
            return
        assert condition == "service_healthy", condition
        deadline = time.monotonic() + CONDITION_TIMEOUT
        while podman("healthcheck", "run", name, check=False, timeout=30).returncode != 0:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{service} not healthy:\n{self.logs(service)}")
            time.sleep(1)

    def logs(self, service: str) -> str:
        out = podman("logs", self.container(service), check=False, timeout=30)
        return (out.stdout + out.stderr)[-4000:]

    def down(self) -> None:
        """``down -v``, and what podman-compose 1.0.3's leaves: the anonymous volumes
        (``podman rm`` without ``-v``; the image declares VOLUME /data and the migrate
        service mounts nothing there) and the project's network."""
        label = f"label=io.podman.compose.project={self.project}"
        ids = podman("ps", "-aq", "--filter", label, timeout=30).stdout.split()
        anonymous = (
            podman(
                "inspect",
                "--format",
                '{{range .Mounts}}{{if eq .Type "volume"}}{{.Name}} {{end}}{{end}}',
                *ids,
                timeout=30,
            ).stdout.split()
            if ids
            else []
        )
        self.compose("down", "-v", "-t", "10", timeout=UP_TIMEOUT)
        for volume in anonymous:
            podman("volume", "rm", volume, check=False, timeout=30)
        sweep(f"io.podman.compose.project={self.project}")

    def remove(self) -> None:
        """Whatever is left after a failure, down or not."""
        try:
            self.down()
        finally:
            sweep(f"io.podman.compose.project={self.project}")

    def leftovers(self) -> list[str]:
        label = f"label=io.podman.compose.project={self.project}"
        found = [
            podman("ps", "-aq", "--filter", label, timeout=30).stdout,
            podman("volume", "ls", "-q", "--filter", label, timeout=30).stdout,
        ]
        return [name for out in found for name in out.split()]


@pytest.fixture
def stack(stowaway_image: str, standin_images: dict[str, str]) -> Iterator[Stack]:
    if PODMAN_COMPOSE is None:
        pytest.skip("podman-compose is not installed (apt-get install podman-compose)")
    made = Stack(
        {
            "STOWAWAY_IMAGE": stowaway_image,
            "POSTGRES_IMAGE": standin_images["postgres"],
            "ORTHANC_IMAGE": standin_images["orthanc"],
            "DICOM_PUBLISH": f"127.0.0.1:{free_port()}",
            "ORTHANC_PUBLISH": f"127.0.0.1:{free_port()}",
        }
    )
    try:
        yield made
    finally:
        made.remove()


def orthanc_instances(url: str) -> set[str]:
    session = requests.Session()
    session.trust_env = False  # no proxy for loopback
    try:
        items = session.get(f"{url}/instances", params={"expand": ""}, timeout=5).json()
    except (requests.RequestException, ValueError):
        return set()
    finally:
        session.close()
    return {str(item["MainDicomTags"]["SOPInstanceUID"]) for item in items}


def test_the_compose_stack_receives_and_forwards_to_its_orthanc_and_comes_down(
    stack: Stack, tmp_path: Path
) -> None:
    stack.up()
    port = int(stack.variables["DICOM_PUBLISH"].rsplit(":", 1)[1])
    orthanc = f"http://{stack.variables['ORTHANC_PUBLISH']}"
    (dicom,) = make_study(tmp_path, 1, seed=31)
    deadline = time.monotonic() + 60
    while True:  # the receiver listens a moment after its container started
        sent = dcmsend(port, [dicom], timeout=30)
        if sent.returncode == 0 or time.monotonic() >= deadline:
            break
        time.sleep(1)
    assert sent.returncode == 0, f"{sent.stdout}{sent.stderr}\n{stack.logs('receiver')}"
    uid = read_uids(dicom).sop_uid
    deadline = time.monotonic() + 90
    while uid not in orthanc_instances(orthanc):
        if time.monotonic() >= deadline:
            raise AssertionError(f"{uid} not in the stack's Orthanc:\n{stack.logs('forwarder')}")
        time.sleep(1)

    try:
        stack.down()
    except PodmanError as exc:
        raise AssertionError(f"down failed: {exc}") from exc
    assert stack.leftovers() == []
