"""The Kubernetes manifests under k8s/: schema-valid, and true to the guide and to stowaway.

Each variant is rendered with the real ``kubectl kustomize`` (kustomize v5), exactly as
``kubectl apply -k`` would build it; where kubectl is not installed the tests that need a
rendering are skipped, saying so.

Every rendered object is validated offline against the Kubernetes 1.30 OpenAPI schemas
shipped by ``kubernetes-validate`` (strict: unknown fields are errors). Container args and
environment are parsed by stowaway's real CLI parser and settings loader.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
K8S_VERSION = "1.30"
VARIANTS = {"base": 1, "overlays/sqlite": 1, "overlays/postgres": 3}

GUIDE_DICOMWEB = (
    "https://healthcare.googleapis.com/v1/projects/PROJECT_ID/locations/LOCATION/"
    "datasets/DATASET_ID/dicomStores/DICOM_STORE_ID/dicomWeb"
)
GUIDE_SERVICE = {
    "apiVersion": "v1",
    "kind": "Service",
    "metadata": {
        "name": "dicom-adapter-load-balancer",
        "annotations": {"cloud.google.com/load-balancer-type": "Internal"},
    },
    "spec": {
        "ports": [{"port": 2575, "targetPort": 2575, "protocol": "TCP", "name": "port"}],
        "selector": {"app": "dicom-adapter"},
        "type": "LoadBalancer",
    },
}
SUBCOMMANDS = {"serve", "receive", "forward", "migrate", "queue", "reconcile", "check"}
DATA_PATH = "/data"
# Values that the cluster supplies at run time (downward API, Secrets), for parsing.
RUNTIME_VALUES = {
    ("fieldRef", "metadata.name"): "stowaway-0",
    ("secretKeyRef", "stowaway-db/url"): "postgresql+psycopg://stowaway:pw@db.invalid/stowaway",
}

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl is not installed: the overlays cannot be rendered"
)


# ------------------------------------------------------------------------------ render


def load_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return parse_docs(f.read(), str(path))


def parse_docs(text: str, where: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    for d in docs:
        assert isinstance(d, dict), f"{where}: a YAML document that is not a mapping"
    return docs


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k directory`` would apply."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr.strip()}"
    return parse_docs(result.stdout, f"kubectl kustomize {directory}")


def pod_containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered")
    return str(request.param), kustomize(K8S / str(request.param))


def statefulset(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return find(objs, "StatefulSet", "stowaway")


def containers_by_name(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in pod_containers(statefulset(objs))}


# ------------------------------------------------------------------ stowaway CLI parsing


def container_environ(c: dict[str, Any], objs: list[dict[str, Any]]) -> dict[str, str]:
    """The environment the container would get (ConfigMaps, literals, runtime values)."""
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        ref = src["configMapRef"]["name"]
        env.update({k: str(v) for k, v in find(objs, "ConfigMap", ref)["data"].items()})
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            key = ("fieldRef", source["fieldRef"]["fieldPath"])
        else:
            ref = source["secretKeyRef"]
            key = ("secretKeyRef", f"{ref['name']}/{ref['key']}")
        assert key in RUNTIME_VALUES, f"{c['name']}: unexpected env source {source}"
        env[item["name"]] = RUNTIME_VALUES[key]
    return env


def parse_stowaway(args: list[str], environ: dict[str, str]) -> tuple[Any, Any]:
    """(argparse namespace, Settings) from stowaway's own parser and settings loader."""
    from stowaway.cli import build_parser
    from stowaway.settings import load_settings

    try:
        ns = build_parser().parse_args(args)
    except SystemExit as exc:  # argparse reports usage errors by exiting
        pytest.fail(f"stowaway rejects args {args}: exit {exc.code}")
    return ns, load_settings(ns, environ)


def known_env_names() -> set[str]:
    from stowaway.settings import OPTIONS

    return {o.env for o in OPTIONS}


# ----------------------------------------------------------------------------- tests


def all_yaml_files() -> Iterator[Path]:
    yield from sorted(K8S.rglob("*.yaml"))
    yield from sorted(K8S.rglob("*.yml"))


def test_every_yaml_file_parses() -> None:
    files = list(all_yaml_files())
    assert len(files) >= 8
    for path in files:
        assert load_docs(path), f"{path} is empty"


def test_objects_validate_against_kubernetes_schema(
    variant: tuple[str, list[dict[str, Any]]],
) -> None:
    name, objs = variant
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == [
        "ConfigMap",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ], name
    for obj in objs:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} {where}: {exc.message}")


def test_guide_service_is_kept_exactly(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = variant
    assert find(objs, "Service", "dicom-adapter-load-balancer") == GUIDE_SERVICE
    # and it reaches the receiver: selector matches the pods, targetPort is the DICOM port
    pod_labels = statefulset(objs)["spec"]["template"]["metadata"]["labels"]
    assert pod_labels["app"] == "dicom-adapter"
    receiver = containers_by_name(objs)["receiver"]
    assert {"name": "port", "containerPort": 2575, "protocol": "TCP"} in receiver["ports"]


def test_statefulset_shape(variant: tuple[str, list[dict[str, Any]]]) -> None:
    name, objs = variant
    sts = statefulset(objs)
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    assert spec["replicas"] == VARIANTS[name]
    assert spec["serviceName"] == "stowaway-headless"
    headless = find(objs, "Service", "stowaway-headless")
    assert headless["spec"]["clusterIP"] == "None"
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert headless["spec"]["selector"].items() <= labels.items()
    assert pod["serviceAccountName"] == "stowaway"
    find(objs, "ServiceAccount", "stowaway")
    assert pod["terminationGracePeriodSeconds"] == 120
    assert [c["name"] for c in pod["initContainers"]] == ["migrate"]
    assert [c["name"] for c in pod["containers"]] == ["receiver", "forwarder"]
    assert {v["name"]: v for v in pod["volumes"]}["tmp"] == {
        "name": "tmp",
        "emptyDir": {"sizeLimit": "1Gi"},
    }
    pdb = find(objs, "PodDisruptionBudget", "stowaway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] == 1
    else:
        assert pdb["spec"]["minAvailable"] < spec["replicas"]


def test_all_containers_mount_the_pvc_at_the_same_path(
    variant: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = variant
    sts = statefulset(objs)
    claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
    assert claims == ["data"]
    assert "data" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    for c in pod_containers(sts):
        mounts = {m["name"]: m for m in c["volumeMounts"]}
        assert mounts["data"]["mountPath"] == DATA_PATH, c["name"]
        assert not mounts["data"].get("readOnly", False), c["name"]
        assert mounts["tmp"]["mountPath"] == "/tmp", c["name"]
        assert container_environ(c, objs)["STOWAWAY_DATA_DIR"] == DATA_PATH


def test_probes_hit_health_endpoints_on_a_declared_port(
    variant: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = variant
    seen_ports: list[int] = []
    for c in statefulset(objs)["spec"]["template"]["spec"]["containers"]:
        declared = {p["name"]: p["containerPort"] for p in c["ports"]}
        _, settings = parse_stowaway(c["args"], container_environ(c, objs))
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = c[probe]["httpGet"]
            assert get["path"] == path, (c["name"], probe)
            port = get["port"]
            number = declared[port] if isinstance(port, str) else port
            assert number in declared.values(), (c["name"], probe, port)
            # ... and it is the port stowaway actually serves its HTTP endpoints on.
            assert number == settings.http_port, (c["name"], probe, number)
        seen_ports.append(settings.http_port)
    assert len(set(seen_ports)) == len(seen_ports), "two containers on one HTTP port"


def test_security_context(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = variant
    pod = statefulset(objs)["spec"]["template"]["spec"]
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == 10001
    assert psc["fsGroup"] == 10001
    for c in pod_containers(statefulset(objs)):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True, c["name"]
        assert sc["runAsUser"] == 10001, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        assert not sc["capabilities"].get("add"), c["name"]
        assert sc.get("privileged", False) is False, c["name"]
        res = c["resources"]
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[section]), (c["name"], section)


def test_containers_run_real_subcommands_with_the_guide_flags(
    variant: tuple[str, list[dict[str, Any]]],
) -> None:
    _, objs = variant
    by_name = containers_by_name(objs)
    expected_command = {"migrate": "migrate", "receiver": "receive", "forwarder": "forward"}
    for name, c in by_name.items():
        assert "command" not in c, f"{name}: keep the image's entrypoint (stowaway)"
        assert c["args"][0] in SUBCOMMANDS, name
        assert c["args"][0] == expected_command[name]
        ns, _ = parse_stowaway(c["args"], container_environ(c, objs))
        assert ns.command == expected_command[name]
        assert c["envFrom"] == [{"configMapRef": {"name": "stowaway-config"}}], name

    receiver, forwarder = by_name["receiver"], by_name["forwarder"]
    assert receiver["args"][1:3] == ["--dimse_aet=IMPORTADAPTER", "--dimse_port=2575"]
    assert f"--dicomweb_address={GUIDE_DICOMWEB}" in forwarder["args"]
    _, rs = parse_stowaway(receiver["args"], container_environ(receiver, objs))
    assert (rs.aet, rs.port, rs.host) == ("IMPORTADAPTER", 2575, "0.0.0.0")
    _, fs = parse_stowaway(forwarder["args"], container_environ(forwarder, objs))
    assert fs.dicomweb_url == GUIDE_DICOMWEB
    assert fs.auth == "google"


def test_node_id_from_pod_name(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = variant
    for c in pod_containers(statefulset(objs)):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["STOWAWAY_NODE_ID"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "metadata.name"}
        }, c["name"]
        _, settings = parse_stowaway(c["args"], container_environ(c, objs))
        assert settings.node_id == "stowaway-0"


def test_queue_database_per_variant(variant: tuple[str, list[dict[str, Any]]]) -> None:
    name, objs = variant
    for c in pod_containers(statefulset(objs)):
        env = {e["name"]: e for e in c.get("env", [])}
        _, settings = parse_stowaway(c["args"], container_environ(c, objs))
        if name == "overlays/postgres":
            assert env["STOWAWAY_DB_URL"]["valueFrom"] == {
                "secretKeyRef": {"name": "stowaway-db", "key": "url"}
            }, c["name"]
            assert settings.db_url.startswith("postgresql+psycopg://")
        else:
            assert "STOWAWAY_DB_URL" not in env, c["name"]
            assert settings.db_url == f"sqlite:///{DATA_PATH}/queue.db"
    assert "STOWAWAY_DB_URL" not in find(objs, "ConfigMap", "stowaway-config")["data"]


ADMIN_TOKENS_SECRET = "stowaway-admin-tokens"
ADMIN_TOKENS_DIR = "/etc/stowaway/admin"


def test_http_containers_take_admin_tokens_from_an_optional_secret(
    variant: tuple[str, list[dict[str, Any]]],
) -> None:
    """Every container with an HTTP API reads its tokens from the Secret's file, mounted
    read-only and whole (so rotations reach it), readable by the container's group only;
    without the Secret the pod starts read-only."""
    name, objs = variant
    pod = statefulset(objs)["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "admin-tokens"]
    secret = volume["secret"]
    assert secret["secretName"] == ADMIN_TOKENS_SECRET
    assert secret["optional"] is True, "the manifests must apply without the Secret"
    assert secret["items"] == [{"key": "tokens", "path": "tokens"}]
    mode = secret["defaultMode"]
    assert mode & 0o440 == 0o440 and mode & 0o337 == 0, f"{name}: mode {mode:o}"
    # Secret files are root's with the fsGroup as group: the container reads them
    # through its group, which must be that fsGroup.
    group = pod["securityContext"]["fsGroup"]
    with_api = containers_by_name(objs)
    del with_api["migrate"]
    assert sorted(with_api) == ["forwarder", "receiver"]
    for c in with_api.values():
        assert c["securityContext"].get("runAsGroup", group) == group, c["name"]
        mounts = [m for m in c["volumeMounts"] if m["name"] == "admin-tokens"]
        assert mounts == [
            {"name": "admin-tokens", "mountPath": ADMIN_TOKENS_DIR, "readOnly": True}
        ], c["name"]
        env = {e["name"]: e for e in c["env"]}
        assert env["STOWAWAY_ADMIN_TOKEN_FILE"] == {
            "name": "STOWAWAY_ADMIN_TOKEN_FILE",
            "value": f"{ADMIN_TOKENS_DIR}/tokens",
        }, c["name"]
        # stowaway itself, given that environment and no Secret, starts read-only.
        assert not Path(ADMIN_TOKENS_DIR).exists()
        _, settings = parse_stowaway(c["args"], container_environ(c, objs))
        assert settings.admin_token_file is None
        assert settings.admin_token_file_absent == Path(ADMIN_TOKENS_DIR) / "tokens"
    migrate = containers_by_name(objs)["migrate"]
    assert "STOWAWAY_ADMIN_TOKEN_FILE" not in {e["name"] for e in migrate["env"]}
    assert "STOWAWAY_ADMIN_TOKEN_FILE" not in find(objs, "ConfigMap", "stowaway-config")["data"]


def test_configmap_keys_are_stowaway_options(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = variant
    data = find(objs, "ConfigMap", "stowaway-config")["data"]
    unknown = set(data) - known_env_names()
    assert not unknown, f"ConfigMap keys stowaway does not read: {unknown}"
    for c in pod_containers(statefulset(objs)):
        literal = {e["name"] for e in c.get("env", [])}
        assert not literal - known_env_names(), c["name"]


def test_workload_identity_and_image(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = variant
    sa = find(objs, "ServiceAccount", "stowaway")
    assert sa["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "stowaway@PROJECT_ID.iam.gserviceaccount.com"
    }
    assert "secrets" not in sa
    images = {c["image"] for c in pod_containers(statefulset(objs))}
    assert images == {"LOCATION-docker.pkg.dev/PROJECT_ID/stowaway/stowaway:0.1.0"}


@needs_kubectl
def test_strategic_merge_keeps_base_env(tmp_path: Path) -> None:
    """An overlay's patch of a container adds to the base's env and keeps its args (what
    the postgres overlay relies on), with the base left as it is."""
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["r"]}]}
    patch = {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}]}]}

    def pod(spec: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "s"},
            "spec": {"template": {"spec": copy.deepcopy(spec)}},
        }

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "sts.yaml").write_text(yaml.safe_dump(pod(base)))
    (tmp_path / "base" / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["sts.yaml"]})
    )
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "patch.yaml").write_text(yaml.safe_dump(pod(patch)))
    (tmp_path / "overlay" / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": ["../base"], "patches": [{"path": "patch.yaml"}]})
    )
    (merged_sts,) = kustomize(tmp_path / "overlay")
    merged = merged_sts["spec"]["template"]["spec"]
    # kustomize lists the patch's new entries first; which entries there are is the point.
    assert sorted(merged["containers"][0]["env"], key=lambda e: e["name"]) == [
        {"name": "X", "value": "1"},
        {"name": "Y", "value": "2"},
    ]
    assert merged["containers"][0]["args"] == ["r"]
    (base_sts,) = kustomize(tmp_path / "base")
    assert base_sts["spec"]["template"]["spec"]["containers"][0]["env"] == [
        {"name": "X", "value": "1"}
    ]


# Built by concatenation so that this file does not match its own patterns.
_KEY_MARKERS = ["-----BEGIN " + "PRIVATE KEY", '"private_key' + '_id"']
# Deploy files must not point at a key file either (Workload Identity instead).
_DEPLOY_MARKERS = ["GOOGLE_APPLICATION_" + "CREDENTIALS", "key" + ".json"]
_DEPLOY_FILES = [REPO / "Dockerfile", REPO / "docker-compose.yml", *sorted(K8S.rglob("*.y*ml"))]
_SKIP_DIRS = {
    ".git",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "build",
    "dist",
    "stowaway-data",
    ".venv",
    "venv",
    "node_modules",
}


def _repo_text_files() -> Iterator[Path]:
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if any(part in _SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if rel.parts[:2] in {("bench", "out"), ("bench", "data")}:
            continue
        if path.is_file() and path.stat().st_size < 1_000_000:
            yield path


def test_no_secrets_in_the_repo() -> None:
    checked = 0
    for path in _repo_text_files():
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for marker in _KEY_MARKERS:
            assert marker not in text, f"{path}: contains {marker!r}"
        if path.suffix in {".yaml", ".yml"}:
            checked += 1
            with path.open() as f:
                docs = [d for d in yaml.safe_load_all(f) if isinstance(d, dict)]
            for doc in docs:
                assert doc.get("kind") != "Secret", f"{path}: a Secret object in the repo"
                assert "stringData" not in doc, path
    assert checked >= 8


def test_deploy_files_use_no_key_files() -> None:
    for path in _DEPLOY_FILES:
        text = path.read_text()
        for marker in _DEPLOY_MARKERS:
            assert marker not in text, f"{path}: contains {marker!r}"
