"""``stowaway serve`` in the image, /data on a named volume, forwarding to the test Orthanc
on the host: it receives through the published port, keeps every acknowledged instance
across ``podman kill -s KILL``, and stops with exit 0 on SIGTERM."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.container.conftest import GRACE_PERIOD, HOST_FROM_CONTAINER, Container, Pods
from tests.container.podman import podman, podman_env
from tests.support.dicom_files import make_study, read_uids
from tests.support.orthanc import OrthancServer
from tests.support.processes import dcmsend
from tests.support.scu import associate

# The first run also makes the base images (mmdebstrap), inside the first test's time.
pytestmark = pytest.mark.timeout(600)

SUCCESS = 0x0000
KILLED_EXIT = 137  # 128 + SIGKILL
# What `podman stop` waits after SIGTERM before SIGKILL: above stowaway's grace period, as
# the StatefulSet's terminationGracePeriodSeconds is above its --grace-period.
STOP_TIMEOUT = GRACE_PERIOD + 10
CT_CONTEXT = [(CTImageStorage, ExplicitVRLittleEndian)]


def serve(pods: Pods, image: str, volume: str, orthanc: OrthancServer) -> Container:
    dicomweb = orthanc.dicomweb_url.replace("127.0.0.1", HOST_FROM_CONTAINER)
    container = pods.stowaway(image, "serve", "--dicomweb-url", dicomweb, volume=volume)
    container.wait_answering("/healthz")
    return container


def wait_for_instances(orthanc: OrthancServer, uids: set[str], timeout: float) -> set[str]:
    """The UIDs of ``uids`` that Orthanc holds once all arrived or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while True:
        held = orthanc.instance_uids() & uids
        if held == uids or time.monotonic() >= deadline:
            return held
        time.sleep(0.5)


class Sender(threading.Thread):
    """Sends ``files`` over one association, one after another; ``acknowledged`` holds the
    SOP Instance UIDs answered with Success. Stops at the first failure (the kill)."""

    def __init__(self, port: int, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.files = files
        self.acknowledged: list[str] = []
        self.error: str | None = None

    def run(self) -> None:
        with associate(self.port, contexts=CT_CONTEXT, timeout=10) as assoc:
            if not assoc.is_established:
                self.error = "no association"
                return
            for path in self.files:
                ds = pydicom.dcmread(path)
                try:
                    status = assoc.send_c_store(ds)
                except Exception as exc:  # the association died with the container
                    self.error = repr(exc)
                    return
                if "Status" not in status or int(status.Status) != SUCCESS:
                    self.error = f"status {status.get('Status')!r}"
                    return
                self.acknowledged.append(str(ds.SOPInstanceUID))


def test_an_instance_sent_through_the_published_port_arrives_in_orthanc(
    stowaway_image: str, pods: Pods, orthanc: OrthancServer, tmp_path: Path
) -> None:
    container = serve(pods, stowaway_image, pods.volume(), orthanc)
    (dicom,) = make_study(tmp_path, 1, seed=21)
    sent = dcmsend(container.port, [dicom], timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    uid = read_uids(dicom).sop_uid
    assert wait_for_instances(orthanc, {uid}, timeout=60) == {uid}, container.logs()[-4000:]
    ready = container.get("/readyz")
    assert ready.status_code == 200, ready.text


def test_every_acknowledged_instance_arrives_after_kill_9_and_a_restart_on_the_volume(
    stowaway_image: str, pods: Pods, orthanc: OrthancServer, tmp_path: Path
) -> None:
    volume = pods.volume()
    first = serve(pods, stowaway_image, volume, orthanc)
    # Large enough (512 KiB each) that the kill lands in the middle of the transfer.
    files = make_study(tmp_path, 40, rows=512, cols=512, seed=22)
    sender = Sender(first.port, files)
    sender.start()
    deadline = time.monotonic() + 60
    while len(sender.acknowledged) < 8 and sender.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    podman("kill", "-s", "KILL", first.name, timeout=30)
    sender.join(60)
    acknowledged = set(sender.acknowledged)
    # serve holds uploads back while a transfer is going on (--sender-first), so what was
    # acknowledged is still only on the volume: the restart has to find it there.
    forwarded_before_restart = orthanc.instance_uids() & acknowledged
    assert first.wait_exit(timeout=30) == KILLED_EXIT
    assert len(acknowledged) >= 8, f"only {len(acknowledged)} acknowledged: {sender.error}"
    assert len(acknowledged) < len(files), "the kill came after the transfer had finished"
    assert forwarded_before_restart != acknowledged, "all forwarded before the kill"

    second = serve(pods, stowaway_image, volume, orthanc)
    held = wait_for_instances(orthanc, acknowledged, timeout=90)
    assert held == acknowledged, (
        f"{len(acknowledged - held)} of {len(acknowledged)} acknowledged instances lost\n"
        f"{second.logs()[-4000:]}"
    )


def test_sigterm_during_an_association_lets_it_finish_and_exits_0_within_the_grace_period(
    stowaway_image: str, pods: Pods, orthanc: OrthancServer, tmp_path: Path
) -> None:
    """``podman stop`` (SIGTERM, then SIGKILL after STOP_TIMEOUT, as an orchestrator does)
    while an association is open: the sender may still finish its work, and stowaway then
    exits 0 by itself, well before its own grace period runs out."""
    container = serve(pods, stowaway_image, pods.volume(), orthanc)
    before, during = (pydicom.dcmread(f) for f in make_study(tmp_path, 2, seed=23))
    with associate(container.port, contexts=CT_CONTEXT, timeout=GRACE_PERIOD + 10) as assoc:
        assert assoc.is_established
        assert int(assoc.send_c_store(before).Status) == SUCCESS
        started = time.monotonic()
        stop = subprocess.Popen(
            ["podman", "stop", "-t", str(STOP_TIMEOUT), container.name],
            env=podman_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_log(container, "stop_requested", timeout=10)
            status = assoc.send_c_store(during)
            assert "Status" in status and int(status.Status) == SUCCESS, status
            assoc.release()
            code = container.wait_exit(timeout=STOP_TIMEOUT + 10)
            seconds = time.monotonic() - started
        finally:
            stop.wait(STOP_TIMEOUT + 10)
    assert code == 0, container.logs()[-4000:]
    assert seconds < GRACE_PERIOD, f"stopped {seconds:.1f} s after SIGTERM"
    uids = {str(before.SOPInstanceUID), str(during.SOPInstanceUID)}
    second = serve(pods, stowaway_image, container.volume, orthanc)
    assert wait_for_instances(orthanc, uids, timeout=60) == uids, second.logs()[-4000:]


def wait_for_log(container: Container, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in container.logs():
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {text!r} in {timeout} s:\n{container.logs()[-4000:]}")
        time.sleep(0.1)
