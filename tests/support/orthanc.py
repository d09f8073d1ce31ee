"""Start a real Orthanc (with the DICOMweb plugin) on loopback for tests.

Usage::

    with OrthancServer(tmp_path / "orthanc") as orthanc:
        requests.post(orthanc.dicomweb_url + "/studies", ...)
        assert sop_uid in orthanc.instance_uids()

or through the pytest fixtures defined at the bottom of this module:

* ``orthanc_server`` (session scope): one Orthanc per test session (per xdist worker).
* ``orthanc`` (function scope): the same server, emptied before the test.

Register them once in ``tests/conftest.py`` with ``pytest_plugins = ["tests.support.orthanc"]``
(or ``from tests.support.orthanc import orthanc_fixture, orthanc_server_fixture``). The
functions carry ``name=``, so importing them never shadows a test's ``orthanc`` argument.

Orthanc 1.10 has no option to bind its HTTP/DICOM listeners to one address: they listen on
all interfaces, but ``RemoteAccessAllowed: false`` makes the HTTP server refuse anything but
loopback clients, and tests only ever talk to 127.0.0.1.

Calls made here use a ``requests.Session`` with ``trust_env = False`` so that an
``HTTP_PROXY`` in the environment can never route loopback traffic elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import requests

from tests.support.processes import terminate

__all__ = [
    "DICOMWEB_PLUGIN",
    "ORTHANC_BINARY",
    "OrthancError",
    "OrthancServer",
    "free_port",
    "orthanc_available",
    "orthanc_fixture",
    "orthanc_server_fixture",
]

ORTHANC_BINARY = Path(os.environ.get("STOWAWAY_TEST_ORTHANC", "/usr/sbin/Orthanc"))
DICOMWEB_PLUGIN = Path(
    os.environ.get(
        "STOWAWAY_TEST_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
    )
)
LOOPBACK = "127.0.0.1"


class OrthancError(RuntimeError):
    """Orthanc failed to start, or answered a helper call unexpectedly."""


def orthanc_available() -> bool:
    """True when the Orthanc binary and its DICOMweb plugin are installed."""
    return ORTHANC_BINARY.is_file() and DICOMWEB_PLUGIN.is_file()


def free_port() -> int:
    """A TCP port that was free on loopback a moment ago (the caller retries on races)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _port_accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout):
            return True
    except OSError:
        return False


class OrthancServer:
    """One Orthanc process with a temporary JSON config, storage and index under ``workdir``.

    Attributes (valid after ``start()``): ``url`` (http://127.0.0.1:PORT), ``dicomweb_url``
    (``url + "/dicom-web"``), ``http_port``, ``dicom_port``, ``aet``, ``config_path``,
    ``log_path`` (kept after ``stop()`` so a failing test can show it).
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        aet: str = "ORTHANC",
        startup_timeout: float = 60.0,
        extra_config: dict[str, Any] | None = None,
        binary: Path = ORTHANC_BINARY,
        dicomweb_plugin: Path = DICOMWEB_PLUGIN,
        http_port: int = 0,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.startup_timeout = startup_timeout
        self.extra_config = dict(extra_config or {})
        self.binary = binary
        self.dicomweb_plugin = dicomweb_plugin
        # 0: a free port at each start; else this one (a destination configured before
        # the server is up, as a store that is down and comes back).
        self._fixed_http_port = http_port
        self.http_port = http_port
        self.dicom_port = 0
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self.storage_dir = self.workdir / "storage"
        self.index_dir = self.workdir / "index"
        self._proc: subprocess.Popen[bytes] | None = None
        self._session = self._new_session()

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def _new_session() -> requests.Session:
        session = requests.Session()
        session.trust_env = False  # no proxy from the environment for loopback calls
        return session

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def config(self) -> dict[str, Any]:
        """The JSON configuration written for Orthanc (ports must be chosen already)."""
        cfg: dict[str, Any] = {
            "Name": f"stowaway-test-{self.http_port}",
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.index_dir),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            # Explicit: since Orthanc 1.5.8 its default follows RemoteAccessAllowed.
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "HttpCompressionEnabled": False,
            "HttpThreadsCount": 16,
            "KeepAlive": True,
            "TcpNoDelay": True,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {},
            "OrthancPeers": {},
            "Plugins": [str(self.dicomweb_plugin)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Ssl": False,
            },
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "StableAge": 1,
            "LuaScripts": [],
            "ExecuteLuaEnabled": False,
            "RestApiWriteToFileSystemEnabled": False,
            "OverwriteInstances": False,
            "CheckRevisions": False,
        }
        cfg.update(self.extra_config)
        return cfg

    def start(self, attempts: int = 3) -> OrthancServer:
        """Pick free ports, write the config, start Orthanc and wait for ``GET /system``.

        Retries with fresh ports when Orthanc exits early (e.g. lost a port race).
        """
        if self.is_running():
            return self
        if not (self.binary.is_file() and self.dicomweb_plugin.is_file()):
            raise OrthancError(
                f"Orthanc not installed ({self.binary}, {self.dicomweb_plugin}); "
                "apt-get install orthanc orthanc-dicomweb"
            )
        last_error: OrthancError | None = None
        for _ in range(attempts):
            try:
                self._start_once()
                return self
            except OrthancError as exc:
                last_error = exc
                self._terminate()
        assert last_error is not None
        raise last_error

    def _start_once(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A fresh database each attempt: a half-started Orthanc may have created one.
        for d in (self.storage_dir, self.index_dir):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
        self.http_port = self._fixed_http_port or free_port()
        self.dicom_port = free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_path, "ab") as log:
            log.write(
                f"\n=== starting Orthanc http={self.http_port} "
                f"dicom={self.dicom_port} ===\n".encode()
            )
            log.flush()
            self._proc = subprocess.Popen(
                [str(self.binary), "--no-jobs", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(
                    f"Orthanc exited with code {self._proc.returncode} during startup; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._system_answers() and _port_accepts(self.dicom_port):
                return
            time.sleep(0.1)
        raise OrthancError(
            f"Orthanc did not answer GET /system within {self.startup_timeout}s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def _system_answers(self) -> bool:
        try:
            r = self._session.get(f"{self.url}/system", timeout=1.0)
        except requests.RequestException:
            return False
        return r.status_code == 200

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds. Returns the exit code."""
        code = self._terminate(timeout)
        self._session.close()
        self._session = self._new_session()  # usable again after a restart
        return code

    def _terminate(self, timeout: float = 15.0) -> int | None:
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        return terminate(proc, timeout)

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, max_chars: int = 6000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-max_chars:]

    # ------------------------------------------------------------------ REST helpers

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """A request to ``url + path``; raises OrthancError on a non-2xx answer."""
        kwargs.setdefault("timeout", 30.0)
        r = self._session.request(method, f"{self.url}{path}", **kwargs)
        if not r.ok:
            raise OrthancError(f"{method} {path} -> HTTP {r.status_code}: {r.text[:500]}")
        return r

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def orthanc_id(self, sop_uid: str) -> str | None:
        """Orthanc's own id of the instance with this SOPInstanceUID, or None."""
        found = self.request("POST", "/tools/lookup", data=sop_uid).json()
        for item in found:
            if item.get("Type") == "Instance":
                return str(item["ID"])
        return None

    def instance_uids(self) -> set[str]:
        """SOPInstanceUIDs of every stored instance (REST ``/instances?expand``)."""
        items = self.get_json("/instances", params={"expand": ""})
        return {str(i["MainDicomTags"]["SOPInstanceUID"]) for i in items}

    def qido_instance_uids(self, **filters: str) -> set[str]:
        """SOPInstanceUIDs found by QIDO-RS ``/dicom-web/instances`` (optional filters)."""
        params = {"limit": "100000", **filters}
        items = self.get_json(
            "/dicom-web/instances", params=params, headers={"Accept": "application/dicom+json"}
        )
        return {str(i["00080018"]["Value"][0]) for i in items}

    def instance_bytes(self, sop_uid: str) -> bytes:
        """The Part-10 file Orthanc stored for ``sop_uid`` (KeyError if absent)."""
        oid = self.orthanc_id(sop_uid)
        if oid is None:
            raise KeyError(sop_uid)
        return self.request("GET", f"/instances/{oid}/file").content

    def count(self) -> int:
        """Number of stored instances."""
        return int(self.get_json("/statistics")["CountInstances"])

    def wait_for_count(self, n: int, timeout: float = 30.0, interval: float = 0.1) -> int:
        """Poll until at least ``n`` instances are stored; returns the count (raises on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            c = self.count()
            if c >= n or time.monotonic() >= deadline:
                break
            time.sleep(interval)
        if c < n:
            raise TimeoutError(f"Orthanc holds {c} instances after {timeout}s, wanted {n}")
        return c

    def reset(self) -> None:
        """Delete every stored patient (and so every study, series and instance)."""
        for pid in self.get_json("/patients"):
            self.request("DELETE", f"/patients/{pid}")

    def stow(self, files: list[bytes], boundary: str = "stowaway-test-boundary") -> Any:
        """A plain STOW-RS POST of Part-10 ``files``; returns the JSON response."""
        body = bytearray()
        for data in files:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            body += data + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        r = self.request(
            "POST",
            "/dicom-web/studies",
            data=bytes(body),
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            },
        )
        return r.json()


# ---------------------------------------------------------------------- pytest fixtures


@pytest.fixture(scope="session", name="orthanc_server")
def orthanc_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc for the session (each xdist worker gets its own, on its own ports).

    Skips when Orthanc is not installed. Its log stays at ``server.log_path`` under pytest's
    basetemp after the run.
    """
    if not orthanc_available():
        pytest.skip("Orthanc not installed: apt-get install orthanc orthanc-dicomweb")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(name="orthanc")
def orthanc_fixture(orthanc_server: OrthancServer) -> Iterator[OrthancServer]:
    """The session Orthanc, emptied before the test (restarted if it died)."""
    if not orthanc_server.is_running():
        orthanc_server.start()
    orthanc_server.reset()
    yield orthanc_server
