"""Images the container tests need, made without a registry, and the stowaway image itself.

No image registry is reachable from these machines, so each base image is a Debian root
file system made by ``mmdebstrap`` from Debian's packages, imported into podman and
finished by a short Containerfile under ``standins/``:

* ``docker.io/library/python:3.11-slim``: bookworm's Python 3.11, so the repository's
  ``Dockerfile`` builds unchanged with ``--pull=never``;
* stand-ins for the compose file's ``postgres`` and ``orthancteam/orthanc`` images, from
  Debian's ``postgresql`` and ``orthanc`` + ``orthanc-dicomweb``.

Each is cached by tag: the image carries a label with a digest of its recipe (suite,
packages, the files of its ``standins/`` directory), and a tag whose label matches is
used as it is, so a second run takes seconds; the imported root file system keeps a tag
of its own (``localhost/stowaway-test/rootfs-NAME:DIGEST``), so only a change of packages
runs mmdebstrap again. A tag with no such label (a real image
pulled from a registry) is used as it is, too.

The stowaway image is built from the repository's Dockerfile with the host network and
the machine's CA bundle and pip configuration mounted read-only, so pip reaches the
package index the way it does on the host; nothing of that goes into the image.

Run ``python -m tests.container.base_images [python|postgres|orthanc|stowaway ...]``
to make them by hand (default: all).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.container.podman import PodmanError, podman, run

REPO = Path(__file__).resolve().parents[2]
STANDINS = Path(__file__).with_name("standins")
SUITE = "bookworm"
RECIPE_LABEL = "org.stowaway.test.recipe"
# The bundle Debian's ca-certificates maintains (update-ca-certificates); pip's `cert`.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
MMDEBSTRAP_TIMEOUT = 600
BUILD_TIMEOUT = 600


@dataclass(frozen=True)
class BaseImage:
    """A Debian root file system with ``packages``, finished by ``standins/<name>``."""

    name: str
    tag: str
    packages: tuple[str, ...]

    @property
    def context(self) -> Path:
        return STANDINS / self.name

    def rootfs(self) -> str:
        """The tag of the imported root file system, named by what mmdebstrap was given."""
        digest = hashlib.sha256(f"{SUITE}\n{','.join(self.packages)}\n".encode())
        return f"localhost/stowaway-test/rootfs-{self.name}:{digest.hexdigest()[:16]}"

    def recipe(self) -> str:
        digest = hashlib.sha256(self.rootfs().encode())
        for path in sorted(p for p in self.context.rglob("*") if p.is_file()):
            digest.update(path.relative_to(self.context).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
        return digest.hexdigest()[:16]


PYTHON = BaseImage(
    "python",
    "docker.io/library/python:3.11-slim",
    ("python3", "python3-pip", "python3-venv", "ca-certificates"),
)
POSTGRES = BaseImage("postgres", "localhost/stowaway-test/postgres:16", ("postgresql",))
ORTHANC = BaseImage(
    "orthanc",
    "localhost/stowaway-test/orthanc:debian",
    ("orthanc", "orthanc-dicomweb", "python3"),
)
BASE_IMAGES = {image.name: image for image in (PYTHON, POSTGRES, ORTHANC)}
STOWAWAY_TAG = "localhost/stowaway-test/stowaway:latest"


def cached(image: BaseImage) -> bool:
    """True when ``image.tag`` exists and is this recipe's build (or a real image)."""
    found = podman(
        "image",
        "inspect",
        "--format",
        '{{index .Labels "%s"}}' % RECIPE_LABEL,  # noqa: UP031 (a Go template's braces)
        image.tag,
        check=False,
        timeout=30,
    )
    if found.returncode != 0:
        return False
    label = found.stdout.strip()
    return label in (image.recipe(), "", "<no value>")


def ensure(image: BaseImage, log: bool = True) -> None:
    """Make ``image.tag`` unless this recipe's build is already there. The root file system
    is kept under its own tag, so a change to a Containerfile or an entrypoint rebuilds in
    seconds; only a change of packages runs mmdebstrap again."""
    if cached(image):
        return
    rootfs = image.rootfs()
    if podman("image", "exists", rootfs, check=False, timeout=30).returncode != 0:
        if log:
            packages = ", ".join(image.packages)
            print(f"making {rootfs} from Debian {SUITE} ({packages})", flush=True)
        with tempfile.TemporaryDirectory(prefix="stowaway-rootfs-") as tmp:
            tar = Path(tmp) / "rootfs.tar"
            run(
                [
                    "mmdebstrap",
                    "--quiet",
                    "--variant=minbase",
                    f"--include={','.join(image.packages)}",
                    SUITE,
                    str(tar),
                ],
                timeout=MMDEBSTRAP_TIMEOUT,
            )
            podman("import", str(tar), rootfs, timeout=300)
    podman(
        "build",
        "--pull=never",
        "--format",
        "docker",
        "--build-arg",
        f"ROOTFS={rootfs}",
        "--label",
        f"{RECIPE_LABEL}={image.recipe()}",
        "-t",
        image.tag,
        str(image.context),
        timeout=BUILD_TIMEOUT,
    )
    prune_replaced()


def pip_config_paths() -> set[Path]:
    """The machine's pip configuration files and the local files they name (certificate
    bundle, constraints), as ``pip config`` reports them. Local directories they name
    (find-links, file:// indexes) stay out: the build reaches the package index over the
    network, and pip only warns about a location it cannot see. The environment's PIP_*
    variables are not the configuration and are left out too."""
    python = [sys.executable, "-m", "pip", "config"]
    debug = subprocess.run(
        [*python, "debug"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    paths: set[Path] = set()
    section = ""
    for line in debug.splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
        # The site file belongs to this interpreter's environment, not to the machine.
        found = re.match(r"^\s+(/\S+), exists: True$", line)
        if found and section in ("global", "user"):
            paths.add(Path(found.group(1)))
    listed = subprocess.run(
        [*python, "list"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        if key.startswith(":env:"):
            continue
        for word in value.strip("'\"").split():
            candidate = Path(word.removeprefix("file://"))
            if candidate.is_absolute() and candidate.is_file():
                paths.add(candidate)
    return paths


def build_mounts() -> list[str]:
    """``-v`` options that show the build the machine's CA bundle and pip configuration."""
    paths = pip_config_paths()
    if CA_BUNDLE.is_file():
        paths.add(CA_BUNDLE)
    return [arg for path in sorted(paths) for arg in ("-v", f"{path}:{path}:ro")]


def build_stowaway(tag: str = STOWAWAY_TAG, context: Path = REPO) -> str:
    """Build the repository's Dockerfile as it is; returns the tag. ``--format docker``
    because the OCI image format has no HEALTHCHECK."""
    ensure(PYTHON)
    podman(
        "build",
        "--pull=never",
        "--format",
        "docker",
        "--network",
        "host",
        *build_mounts(),
        # Marks the test's builds (the Dockerfile has no labels) so that the ones a
        # rebuild replaced can be pruned.
        "--label",
        f"{RECIPE_LABEL}=stowaway",
        "-t",
        tag,
        "-f",
        str(context / "Dockerfile"),
        str(context),
        timeout=BUILD_TIMEOUT,
    )
    prune_replaced()
    return tag


def prune_replaced() -> None:
    """Remove this module's images that a rebuild left without a tag."""
    podman("image", "prune", "-f", "--filter", f"label={RECIPE_LABEL}", check=False, timeout=120)


def main(argv: list[str]) -> int:
    names = argv or [*BASE_IMAGES, "stowaway"]
    try:
        for name in names:
            if name == "stowaway":
                print(build_stowaway())
            elif name in BASE_IMAGES:
                ensure(BASE_IMAGES[name])
                print(BASE_IMAGES[name].tag)
            else:
                print(f"unknown image {name!r}; one of {[*BASE_IMAGES, 'stowaway']}")
                return 2
    except PodmanError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
