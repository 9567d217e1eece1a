"""deploy/: the compose file and the Kubernetes manifests say what the operators rely on — a
self-initiating replica set, the roles, probes, non-root, and only settings hookline knows."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to parse the deploy files")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SETTINGS_ENV = {f"HOOKLINE_{name.upper()}" for name in Settings.model_fields}


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    [doc] = load(DEPLOY / "docker-compose.yml")
    return doc


@pytest.fixture(scope="module")
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    docs = [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in load(path)]
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


def hookline_env_names(env: dict[str, Any]) -> set[str]:
    return {name for name in env if name.startswith("HOOKLINE_")}


# compose


def test_mongo_is_a_replica_set_that_initiates_itself(compose: dict[str, Any]) -> None:
    mongo = compose["services"]["mongo"]
    assert mongo["image"].startswith("mongo:7")
    assert "--replSet" in mongo["command"] and "rs0" in mongo["command"]
    assert "rs.initiate(" in " ".join(mongo["healthcheck"]["test"])


def test_the_services_run_their_roles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["api"]["command"] == ["serve", "--roles", "api"]
    assert services["worker"]["command"] == ["serve", "--roles", "dispatcher,reaper"]
    assert services["worker"]["deploy"]["replicas"] >= 2
    assert services["simulator"]["command"][:1] == ["simulator"]
    assert "mc mb" in " ".join(services["minio-init"]["entrypoint"])


def test_hookline_waits_for_its_dependencies(compose: dict[str, Any]) -> None:
    for name in ("api", "worker"):
        service = compose["services"][name]
        depends = service["depends_on"]
        assert depends["mongo"]["condition"] == "service_healthy"
        assert depends["minio-init"]["condition"] == "service_completed_successfully"
        assert depends["simulator"]["condition"] == "service_healthy"
        assert "/healthz" in " ".join(service["healthcheck"]["test"])


def test_compose_environment_names_are_settings(compose: dict[str, Any]) -> None:
    env = compose["services"]["api"]["environment"]
    names = hookline_env_names(env) | hookline_env_names(
        compose["services"]["simulator"]["environment"]
    )
    assert names <= SETTINGS_ENV, names - SETTINGS_ENV
    assert env["HOOKLINE_STORE_URL"] == "mongodb://mongo:27017/hookline?replicaSet=rs0"
    assert env["HOOKLINE_BLOB_URL"] == "s3://hookline"
    assert env["HOOKLINE_PROVIDER"] == "replicate"
    assert env["HOOKLINE_REPLICATE_BASE_URL"] == "http://simulator:9000/v1"
    assert env["HOOKLINE_OUTPUT_HOSTS"] == "simulator:9000"
    assert compose["services"]["worker"]["environment"] == env


def test_the_simulator_is_locked_to_this_deployment(compose: dict[str, Any]) -> None:
    """The standalone simulator shares its token with hookline (and has one: never a default),
    posts webhooks only to hookline's public URL, and fetches URL inputs only from hookline and
    MinIO's presigned URLs."""
    from service.providers import sim_config, sim_input_hosts

    sim = compose["services"]["simulator"]["environment"]
    api = compose["services"]["api"]["environment"]
    assert sim["HOOKLINE_SIM_API_TOKEN"] == api["HOOKLINE_REPLICATE_API_TOKEN"] != "sim-token"
    assert sim["HOOKLINE_PUBLIC_URL"] == api["HOOKLINE_PUBLIC_URL"]
    fields = {name.removeprefix("HOOKLINE_").lower(): value for name, value in sim.items()}
    settings = Settings(_env_file=None, **fields)  # type: ignore[call-arg]
    config = sim_config(settings)
    assert config.api_token == api["HOOKLINE_REPLICATE_API_TOKEN"]
    assert config.webhook_hosts == {"api:8000"}
    assert sim_input_hosts(settings) == {"api:8000", api["HOOKLINE_S3_ENDPOINT"]}


# Dockerfile


def test_the_image_runs_hookline_as_a_non_root_user() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    assert [line for line in lines if line.startswith("FROM")] == ["FROM python:3.11-slim"]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and not users[-1].startswith(("root", "0"))
    assert 'ENTRYPOINT ["hookline"]' in lines and 'CMD ["serve"]' in lines
    text = "\n".join(lines)
    assert "HEALTHCHECK" in text and "/healthz" in text and "pip install ." in text


# Kubernetes


@pytest.mark.parametrize(
    ("name", "roles"), [("hookline-api", "api"), ("hookline-worker", "dispatcher,reaper")]
)
def test_deployments_probe_limit_and_run_as_non_root(
    manifests: dict[tuple[str, str], dict[str, Any]], name: str, roles: str
) -> None:
    spec = manifests[("Deployment", name)]["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    [container] = spec["containers"]
    assert container["args"] == ["serve", "--roles", roles]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"requests", "limits"} <= set(container["resources"])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    sources = {next(iter(ref.values()))["name"] for ref in container["envFrom"]}
    assert sources == {"hookline-config", "hookline-secrets"}


def test_manifests_are_namespace_less_and_complete(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    assert all("namespace" not in doc["metadata"] for doc in manifests.values())
    kinds = {kind for kind, _ in manifests}
    assert {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"} <= kinds
    service = manifests[("Service", "hookline-api")]
    api_labels = manifests[("Deployment", "hookline-api")]["spec"]["template"]["metadata"]
    assert service["spec"]["selector"].items() <= api_labels["labels"].items()


def test_config_and_secret_hold_only_settings_and_placeholders(
    manifests: dict[tuple[str, str], dict[str, Any]],
) -> None:
    config = manifests[("ConfigMap", "hookline-config")]["data"]
    secret = manifests[("Secret", "hookline-secrets")]["stringData"]
    names = set(config) | set(secret)
    assert names <= SETTINGS_ENV, names - SETTINGS_ENV
    assert "replicaSet=" in config["HOOKLINE_STORE_URL"]
    assert all("REPLACE-ME" in value for value in secret.values())


# the docker client, when there is one


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the docker client has no compose plugin")
    result = subprocess.run(
        [docker, "compose", "-f", str(DEPLOY / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
