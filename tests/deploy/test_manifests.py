"""deploy/: the compose file checked against the Compose specification's JSON schema (check-jsonschema's
vendored copy) and the Kubernetes manifests against the Kubernetes API schemas (kubernetes-validate,
strict: unknown fields fail), both offline; then what the schemas cannot know: probes on the right
paths and port, non-root and read-only, resources, the settings parse as the service reads them, the
secret holds what the pods ask of it, the HPA and Service point at the Deployment."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import REPO

from thali.api import Settings

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
REGISTRY_ENV = {"THALI_REGISTRY", "THALI_REGISTRY_OPTIONS", "THALI_CACHE", "THALI_TRUSTED_KEYS"}
STORE_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"}


def _check_jsonschema() -> str:
    pytest.importorskip("check_jsonschema", reason="check-jsonschema is in the dev extra")
    found = Path(sys.executable).parent / "check-jsonschema"
    return str(found if found.exists() else shutil.which("check-jsonschema"))


def _compose_errors(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def _known_setting(name: str) -> bool:
    fields = {f"THALI_{f.upper()}" for f in Settings.model_fields}
    return name in fields or name in REGISTRY_ENV or name in STORE_ENV or name == "HOME"


# --- compose ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yaml").read_text())


def test_the_compose_file_follows_the_compose_specification() -> None:
    result = _compose_errors(DEPLOY / "docker-compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_check_catches_a_broken_file(tmp_path: Path, compose: dict[str, Any]) -> None:
    broken = dict(compose)
    broken["services"] = {**compose["services"], "api": {**compose["services"]["api"], "replicas_": 2}}
    broken["services"]["ui"] = {**compose["services"]["ui"], "ports": "8501"}  # a string, not a list
    path = tmp_path / "docker-compose.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = _compose_errors(path)
    assert result.returncode != 0 and "replicas_" in result.stdout, result.stdout


def test_compose_runs_two_watching_api_replicas_on_one_store_and_the_ui(compose: dict[str, Any]) -> None:
    services = compose["services"]
    api, ui, seed = services["api"], services["ui"], services["seed"]
    assert api["deploy"]["replicas"] == 2
    assert api["build"]["target"] == "serve" and api["build"]["args"]["THALI_EXTRAS"] == "s3"
    command = api["command"]
    assert command[0] == "serve" and float(command[command.index("--watch") + 1]) > 0
    env = api["environment"]
    assert env["THALI_REGISTRY"].startswith("s3://") and "http://minio:9000" in env["THALI_REGISTRY_OPTIONS"]
    assert all(_known_setting(name) for name in env), sorted(env)
    assert api["read_only"] is True and "/tmp" in api["tmpfs"] and env["THALI_CACHE"].startswith("/tmp/")
    assert api["depends_on"]["seed"]["condition"] == "service_completed_successfully"
    assert seed["depends_on"]["minio"]["condition"] == "service_healthy"
    # the ports of the two replicas, and nothing listens beyond this machine
    assert api["ports"] == ["127.0.0.1:8000-8001:8000"]
    assert all(str(p).startswith("127.0.0.1:") for s in services.values() for p in s.get("ports", []))
    assert ui["command"][:1] == ["ui"] and "http://api:8000" in ui["command"]
    assert ui["depends_on"]["api"]["condition"] == "service_healthy"
    # the seed copies the bundled registry, which exists beside deploy/
    source = seed["volumes"][0].split(":")[0]
    assert (DEPLOY / source).resolve() == REPO / "models" and (REPO / "models").is_dir()
    assert "mc mirror /seed store/models/registry" in seed["command"][0]
    publish = services["publish"]
    assert publish["profiles"] == ["tools"] and publish["build"]["target"] == "train"
    assert publish["environment"]["THALI_REGISTRY"] == env["THALI_REGISTRY"]


def test_the_compose_settings_parse_as_the_service_reads_them(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = compose["services"]["api"]["environment"]
    for name, value in env.items():
        monkeypatch.setenv(name, str(value).replace("${THALI_ADMIN_KEY:-}", ""))
    settings = Settings()
    assert settings.admin_key is None  # left empty: admin endpoints off


# --- Kubernetes -------------------------------------------------------------------------------------


def _documents() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    return _documents()


def test_every_manifest_is_valid_for_kubernetes_strictly(k8s: dict[tuple[str, str], Any]) -> None:
    validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    version = validate.latest_version()
    for doc in k8s.values():
        validate.validate(doc, version, strict=True)  # raises ValidationError naming the field
    kinds = {kind for kind, _ in k8s}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap", "Secret"} <= kinds


def test_the_kubernetes_check_catches_a_broken_manifest(k8s: dict[tuple[str, str], Any]) -> None:
    validate = pytest.importorskip("kubernetes_validate")
    deployment = yaml.safe_load(yaml.safe_dump(k8s[("Deployment", "thali-api")]))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(validate.ValidationError, match="paht"):
        validate.validate(deployment, validate.latest_version(), strict=True)
    deployment = yaml.safe_load(yaml.safe_dump(k8s[("Deployment", "thali-api")]))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(validate.ValidationError):
        validate.validate(deployment, validate.latest_version(), strict=True)


def test_kustomization_lists_every_manifest() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_the_api_deployment_probes_runs_unprivileged_and_is_bounded(k8s: dict[tuple[str, str], Any]) -> None:
    deployment = k8s[("Deployment", "thali-api")]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    assert port == 8000 and container["args"][:1] == ["serve"] and "0.0.0.0" in container["args"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # the only writable place is an emptyDir at /tmp, where the settings put the registry's cache
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts == {"/tmp": "tmp"} and "emptyDir" in volumes["tmp"]
    settings = k8s[("ConfigMap", "thali-settings")]["data"]
    assert settings["THALI_CACHE"].startswith("/tmp/")
    assert pod["terminationGracePeriodSeconds"] > 30  # gunicorn's graceful timeout


def test_settings_come_from_the_configmap_and_secrets_from_the_secret(
    k8s: dict[tuple[str, str], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    container = k8s[("Deployment", "thali-api")]["spec"]["template"]["spec"]["containers"][0]
    config = k8s[("ConfigMap", "thali-settings")]
    secret = k8s[("Secret", "thali-secrets")]
    assert container["envFrom"] == [{"configMapRef": {"name": "thali-settings"}}]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert {"THALI_ADMIN_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(refs)
    for ref in refs.values():
        assert ref["name"] == "thali-secrets" and ref["key"] in secret["stringData"]
    assert not ({"THALI_ADMIN_KEY", "AWS_SECRET_ACCESS_KEY"} & set(config["data"]))  # no secret in plain
    assert all(_known_setting(name) for name in config["data"]), sorted(config["data"])
    for name, value in {**config["data"], **secret["stringData"]}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # the ConfigMap's values parse exactly as the service reads them
    assert settings.watch_s and settings.watch_s > 0
    assert settings.domains == ["south_asian_food@production", "plant_disease@production"]
    assert settings.ort_spinning is False and settings.admin_key is None


def test_the_service_and_autoscaler_point_at_the_api(k8s: dict[tuple[str, str], Any]) -> None:
    deployment = k8s[("Deployment", "thali-api")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = k8s[("Service", "thali-api")]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    hpa = k8s[("HorizontalPodAutoscaler", "thali-api")]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "thali-api")
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    ui = k8s[("Deployment", "thali-ui")]["spec"]["template"]["spec"]["containers"][0]
    assert f"http://{service['metadata']['name']}" in ui["args"]
    assert ui["securityContext"]["readOnlyRootFilesystem"] is True


# --- safe defaults (issue 24) -----------------------------------------------------------------------


def test_no_default_credentials_a_trust_key_documented_and_metrics_off_the_public_port(
    compose: dict[str, Any], k8s: dict[tuple[str, str], Any]
) -> None:
    import re

    text = (DEPLOY / "docker-compose.yaml").read_text()
    # a credential is required (compose stops with a message), never defaulted
    for name in ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        assert re.search(rf"\$\{{{name}:\?[^}}]+\}}", text) and not re.search(rf"\$\{{{name}:-", text), name
    api = compose["services"]["api"]
    assert "THALI_TRUSTED_KEYS" in api["environment"] and "thali registry keygen" in text
    assert "THALI_TRUSTED_KEYS" in (K8S / "configmap.yaml").read_text()
    assert api["command"][api["command"].index("--metrics-port") + 1] == "9100"
    assert all(not str(p).endswith(":9100") for p in api.get("ports", []))  # not published
    deployment = k8s[("Deployment", "thali-api")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["args"][container["args"].index("--metrics-port") + 1] == str(ports["metrics"])
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(
        ports["metrics"]
    )
    service = k8s[("Service", "thali-api")]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    # the shipped secret holds placeholders, which a server refuses (tests/api/test_attacks.py runs it)
    from thali.api.settings import PLACEHOLDERS

    values = k8s[("Secret", "thali-secrets")]["stringData"]
    assert {values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"]} <= PLACEHOLDERS
