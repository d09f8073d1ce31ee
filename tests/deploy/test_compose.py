"""docker-compose.yml, the Dockerfile and .dockerignore: static checks (no Docker here).

Each stowaway service's command and environment are parsed by stowaway's real CLI parser
and settings loader, so a renamed flag or variable breaks this test, not a deployment.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
SUBCOMMANDS = {"serve", "receive", "forward", "migrate", "queue", "reconcile", "check"}
STOWAWAY_SERVICES = {"migrate": "migrate", "receiver": "receive", "forwarder": "forward"}
DATA_PATH = "/data"


# Compose's interpolation with a default: ${NAME:-default}.
VARIABLE = re.compile(r"\$\{(?P<name>\w+):-(?P<default>[^}]*)\}")


def interpolate(node: Any, environ: dict[str, str]) -> Any:
    """What compose makes of ``node`` with ``environ`` as its variables."""
    if isinstance(node, str):
        return VARIABLE.sub(lambda m: environ.get(m["name"]) or m["default"], node)
    if isinstance(node, list):
        return [interpolate(item, environ) for item in node]
    if isinstance(node, dict):
        return {key: interpolate(value, environ) for key, value in node.items()}
    return node


def load_compose(environ: dict[str, str]) -> dict[str, Any]:
    with COMPOSE.open() as f:
        doc = yaml.safe_load(f)  # resolves the x-stowaway anchors and << merges
    assert isinstance(doc, dict)
    return dict(interpolate(doc, environ))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as it runs with no variables set (every default)."""
    return load_compose({})


def test_images_default_to_the_real_ones_and_are_overridable(compose: dict[str, Any]) -> None:
    images = {name: svc["image"] for name, svc in services(compose).items()}
    assert images == {
        "postgres": "postgres:16",
        "migrate": "stowaway:dev",
        "receiver": "stowaway:dev",
        "forwarder": "stowaway:dev",
        "orthanc": "orthancteam/orthanc:25.2.0",
    }
    overrides = {"STOWAWAY_IMAGE": "a/s:1", "POSTGRES_IMAGE": "a/p:1", "ORTHANC_IMAGE": "a/o:1"}
    changed = {name: svc["image"] for name, svc in services(load_compose(overrides)).items()}
    assert changed == {
        "postgres": "a/p:1",
        "migrate": "a/s:1",
        "receiver": "a/s:1",
        "forwarder": "a/s:1",
        "orthanc": "a/o:1",
    }


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def depends(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on", {})
    assert isinstance(deps, dict), "use the long depends_on form with conditions"
    return {name: spec["condition"] for name, spec in deps.items()}


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """volume or host path -> container path (short syntax)."""
    out: dict[str, str] = {}
    for v in svc.get("volumes", []):
        source, target = str(v).split(":")[:2]
        out[source] = target
    return out


def image_env(prefix: str = "") -> dict[str, str]:
    """ENV defaults that the Dockerfile bakes into the image."""
    env: dict[str, str] = {}
    for m in re.finditer(r"^ENV\s+((?:.*\\\n)*.*)$", DOCKERFILE.read_text(), re.MULTILINE):
        for pair in shlex.split(m.group(1).replace("\\\n", " ")):
            key, _, value = pair.partition("=")
            env[key] = value
    return {k: v for k, v in env.items() if k.startswith(prefix)}


def parse_stowaway(args: list[str], environ: dict[str, str]) -> tuple[Any, Any]:
    from stowaway.cli import build_parser
    from stowaway.settings import load_settings

    try:
        ns = build_parser().parse_args(args)
    except SystemExit as exc:  # argparse reports usage errors by exiting
        pytest.fail(f"stowaway rejects args {args}: exit {exc.code}")
    return ns, load_settings(ns, environ)


def effective_env(svc: dict[str, Any]) -> dict[str, str]:
    return {**image_env("STOWAWAY_"), **environment(svc)}


def test_services_present(compose: dict[str, Any]) -> None:
    assert set(services(compose)) >= {"postgres", "migrate", "receiver", "forwarder", "orthanc"}
    assert "spool" in compose["volumes"]


def test_stowaway_commands_are_real_subcommands(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    for name, sub in STOWAWAY_SERVICES.items():
        svc = svcs[name]
        assert svc["build"] == "." and "entrypoint" not in svc, name
        args = command(svc)
        assert args[0] in SUBCOMMANDS and args[0] == sub, name
        ns, _ = parse_stowaway(args, effective_env(svc))
        assert ns.command == sub


def test_env_names_are_stowaway_options(compose: dict[str, Any]) -> None:
    from stowaway.settings import OPTIONS

    known = {o.env for o in OPTIONS}
    for name in STOWAWAY_SERVICES:
        env = environment(services(compose)[name])
        unknown = {k for k in env if k.startswith("STOWAWAY_")} - known
        assert not unknown, f"{name}: {unknown}"
    assert not set(image_env("STOWAWAY_")) - known


def test_queue_is_the_compose_postgres(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    pg = environment(svcs["postgres"])
    assert svcs["postgres"]["image"] == "postgres:16"
    assert "pg_isready" in " ".join(svcs["postgres"]["healthcheck"]["test"])
    for name in STOWAWAY_SERVICES:
        _, settings = parse_stowaway(command(svcs[name]), effective_env(svcs[name]))
        url = urlparse(settings.db_url)
        assert url.scheme == "postgresql+psycopg", name
        assert url.hostname == "postgres" and url.hostname in svcs, name
        assert (url.username, url.password) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"])
        assert url.path.lstrip("/") == pg["POSTGRES_DB"], name


def test_shared_spool_volume(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    paths = {}
    node_ids = {}
    for name in ("receiver", "forwarder"):
        svc = svcs[name]
        target = mounts(svc)["spool"]
        paths[name] = target
        _, settings = parse_stowaway(command(svc), effective_env(svc))
        # the volume holds the data dir, so the spool (default <data-dir>/spool) is on it
        assert str(settings.data_dir) == target == DATA_PATH, name
        assert str(settings.spool_dir).startswith(target + "/"), name
        node_ids[name] = settings.node_id
    assert paths["receiver"] == paths["forwarder"]
    # the forwarder forwards what was spooled under its own node id: they must agree
    assert node_ids["receiver"] == node_ids["forwarder"]


def test_depends_on_conditions(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    assert depends(svcs["migrate"]) == {"postgres": "service_healthy"}
    assert depends(svcs["receiver"]) == {"migrate": "service_completed_successfully"}
    assert depends(svcs["forwarder"]) == {
        "migrate": "service_completed_successfully",
        "orthanc": "service_healthy",
    }
    assert svcs["migrate"]["restart"] == "no"
    for name, deps in ((n, depends(s)) for n, s in svcs.items()):
        assert set(deps) <= set(svcs), name


def test_healthchecks(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    for name in ("receiver", "forwarder"):
        svc = svcs[name]
        test = " ".join(svc["healthcheck"]["test"])
        m = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", test)
        assert m, f"{name}: healthcheck does not GET /healthz"
        _, settings = parse_stowaway(command(svc), effective_env(svc))
        assert int(m.group(1)) == settings.http_port, name
        assert not svc["healthcheck"].get("disable", False)
    for name in ("postgres", "orthanc"):
        assert svcs[name]["healthcheck"]["test"], name
    assert svcs["migrate"]["healthcheck"] == {"disable": True}


# What compose waits after SIGTERM before SIGKILL when a service sets no stop_grace_period.
COMPOSE_DEFAULT_STOP_SECONDS = 10.0


def duration_seconds(text: str) -> float:
    """A compose duration such as ``45s``, ``1m30s`` or ``500ms``, in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def test_stowaway_services_are_stopped_only_after_their_grace_period(
    compose: dict[str, Any],
) -> None:
    """``down`` must not SIGKILL a stowaway that is still letting associations and uploads
    finish within --grace-period."""
    for name in STOWAWAY_SERVICES:
        svc = services(compose)[name]
        _, settings = parse_stowaway(command(svc), effective_env(svc))
        stop = svc.get("stop_grace_period")
        seconds = duration_seconds(stop) if stop else COMPOSE_DEFAULT_STOP_SECONDS
        assert seconds > settings.grace_period, name


def test_ports(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    assert "2575:2575" in svcs["receiver"]["ports"]
    assert any(str(p).endswith(":8042") for p in svcs["orthanc"]["ports"])
    _, settings = parse_stowaway(command(svcs["receiver"]), effective_env(svcs["receiver"]))
    assert (settings.aet, settings.port) == ("IMPORTADAPTER", 2575)


def test_forwarder_targets_the_compose_orthanc(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    fwd = svcs["forwarder"]
    args = command(fwd)
    assert args[args.index("--dicomweb-url") + 1] == "http://orthanc:8042/dicom-web"
    _, settings = parse_stowaway(args, effective_env(fwd))
    assert settings.dicomweb_url == "http://orthanc:8042/dicom-web"
    assert settings.auth == "none"
    orthanc = svcs["orthanc"]
    assert orthanc["image"].startswith("orthancteam/orthanc:")
    env = environment(orthanc)
    assert env["DICOM_WEB_PLUGIN_ENABLED"] == "true"
    assert env["ORTHANC__AUTHENTICATION_ENABLED"] == "false"


# ------------------------------------------------------------------------ Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    ins = dockerfile_instructions()
    last = dict(ins)  # the last value of each instruction, which is the one in effect
    assert [v for k, v in ins if k == "FROM"] == ["python:3.11-slim"]
    assert last["USER"] in {"10001", "10001:10001"}
    assert json.loads(last["ENTRYPOINT"]) == ["stowaway"]
    assert json.loads(last["CMD"]) == ["serve"]
    assert last["VOLUME"] == DATA_PATH
    assert set(last["EXPOSE"].split()) == {"2575", "8080"}
    assert image_env("STOWAWAY_") == {"STOWAWAY_DATA_DIR": DATA_PATH, "STOWAWAY_LOG_FORMAT": "json"}
    run = " ".join(v for k, v in ins if k == "RUN")
    assert "pip install /src" in run and "--uid 10001" in run
    health = last["HEALTHCHECK"]
    assert "urllib.request" in health and "127.0.0.1" in health and "/healthz" in health
    assert "curl" not in health


def test_dockerignore_keeps_what_pip_install_needs() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", "tests", "k8s"} <= patterns
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    needed = {"pyproject.toml", project["project"].get("readme", "README.md")}
    needed |= {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    assert not needed & patterns, f".dockerignore drops {needed & patterns}"
