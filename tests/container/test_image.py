"""The image built from the repository's Dockerfile: who it runs as, where it may write,
its HEALTHCHECK, and what it installs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.container.conftest import Pods
from tests.container.podman import podman
from tests.support.dicom_files import make_study
from tests.support.processes import dcmsend

# The first run also makes the base images (mmdebstrap), inside the first test's time.
pytestmark = pytest.mark.timeout(600)

IMAGE_UID = 10001
# Run inside the image: what the stowaway distribution put into site-packages, and
# whether any of the repository's other folder names became importable on their own.
INSTALLED_PROBE = """
import importlib.metadata, importlib.util, json, pathlib, sysconfig
from stowaway.db.migrate import SCRIPT_LOCATION
dist = importlib.metadata.distribution("stowaway")
purelib = pathlib.Path(sysconfig.get_paths()["purelib"])
tops = set()
for f in dist.files:
    path = pathlib.Path(dist.locate_file(f)).resolve()
    if path.is_relative_to(purelib):
        tops.add(path.relative_to(purelib).parts[0])
print(json.dumps({
    "tops": sorted(t for t in tops if not t.endswith(".dist-info")),
    "top_level_txt": (dist.read_text("top_level.txt") or "").split(),
    "bare": [n for n in ("db", "receiver", "forwarder", "migrations")
             if importlib.util.find_spec(n) is not None],
    "migrations": all((SCRIPT_LOCATION / n).exists() for n in ("env.py", "versions")),
    "source_left": pathlib.Path("/src").exists(),
}))
"""


def test_the_installed_package_has_no_top_level_name_but_stowaway(stowaway_image: str) -> None:
    out = podman(
        "run", "--rm", "--entrypoint", "python", stowaway_image, "-c", INSTALLED_PROBE, timeout=60
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["tops"] == ["stowaway"]
    assert found["top_level_txt"] == ["stowaway"]
    assert found["bare"] == [], "the repository's folders must install under stowaway.*"
    assert found["migrations"], "the alembic environment is missing from the image"
    assert not found["source_left"], "the build context stayed in the image"


def test_the_image_declares_its_user_and_healthcheck(stowaway_image: str) -> None:
    out = podman("image", "inspect", stowaway_image, timeout=30)
    (image,) = json.loads(out.stdout)
    assert image["Config"].get("User") == f"{IMAGE_UID}:{IMAGE_UID}"
    assert image["Healthcheck"]["Test"][0] == "CMD", "HEALTHCHECK lost (OCI format?)"


def test_serve_runs_as_10001_on_a_read_only_root_and_writes_only_data_and_tmp(
    stowaway_image: str, pods: Pods, tmp_path: Path
) -> None:
    """Only /data (a named volume) and /tmp (a tmpfs) are writable; stowaway starts, is
    healthy by its own HEALTHCHECK, and takes an instance through the published port."""
    volume = pods.volume()
    container = pods.stowaway(
        stowaway_image,
        "serve",
        volume=volume,
        extra=("--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,mode=1777"),
    )
    container.wait_answering("/healthz")

    health = podman("healthcheck", "run", container.name, check=False, timeout=30)
    assert health.returncode == 0, f"HEALTHCHECK failed: {health.stdout}{health.stderr}"

    pid1 = container.exec("python", "-c", "import os; print(os.stat('/proc/1').st_uid)")
    assert pid1.stdout.strip() == str(IMAGE_UID), pid1.stderr

    (dicom,) = make_study(tmp_path, 1)
    sent = dcmsend(container.port, [dicom], timeout=60)
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "Success" in sent.stdout + sent.stderr

    owners = container.exec("stat", "-c", "%u %n", "/data/queue.db", "/data/spool")
    assert owners.returncode == 0, owners.stderr
    assert {line.split()[0] for line in owners.stdout.splitlines()} == {str(IMAGE_UID)}

    # Even root in the container cannot write outside /data and /tmp.
    for path in ("/probe", "/usr/local/probe", "/var/probe", "/nonexistent"):
        write = container.exec("touch", path, user="0")
        assert write.returncode != 0, f"{path} is writable"
        assert "Read-only file system" in write.stderr, write.stderr
    tmp = container.exec("touch", "/tmp/probe")
    assert tmp.returncode == 0, tmp.stderr
