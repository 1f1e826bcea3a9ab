"""The deployment files, checked offline: hadolint on the Dockerfile, the kustomize output
of the base and the GPU overlay and the KServe service against Kubernetes' schemas (and the
vendored CRD schemas), the compose files against the Compose specification's schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_files import (
    COMPOSE_FILES,
    CRD_SCHEMAS,
    KSERVE,
    KUBECTL,
    KUSTOMIZATIONS,
    ROOT,
    SCHEMAS,
    crd_validator,
    load_yaml_docs,
    render,
)

# The oldest Kubernetes these manifests are meant for, and the newest the schemas know.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (kustomize) not installed")


def test_hadolint_passes_on_the_dockerfile() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run(
        [str(hadolint), "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def validate(doc: dict) -> None:
    """One object against its schema: Kubernetes' own (strict: no unknown fields), or the
    vendored CRD's; an object of neither kind fails."""
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        errors = [
            f"{list(e.absolute_path)}: {e.message}" for e in crd_validator(*key).iter_errors(doc)
        ]
        if errors:
            raise jsonschema.ValidationError("\n".join(errors))
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomize_output_validates(name: str) -> None:
    docs = render(KUSTOMIZATIONS[name])
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Namespace",
            "NetworkPolicy",
            "PersistentVolumeClaim",
            "PodDisruptionBudget",
            "Service",
            "ServiceMonitor",
        ]
    )
    for doc in docs:
        validate(doc)


@needs_kubectl
def test_gpu_overlay_asks_for_a_gpu_on_gpu_nodes() -> None:
    docs = render(KUSTOMIZATIONS["gpu"])
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["image"].endswith("-cuda")
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config_map["data"]["CREDENCE_DEVICE"] == "cuda"  # merged into the base's settings
    assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]


def test_kserve_inference_service_validates() -> None:
    (service,) = load_yaml_docs(KSERVE)
    validate(service)
    (container,) = service["spec"]["predictor"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert container["name"] == "kserve-container"  # the name KServe routes to
    assert env["PROTOCOL"] == "v2"  # how a custom predictor declares the V2 protocol


def test_crd_schemas_refuse_what_the_api_server_would() -> None:
    """The strict CRD schemas are not vacuous: a misspelt field and a wrong type fail."""
    (service,) = load_yaml_docs(KSERVE)
    service["spec"]["predictor"]["containerz"] = []
    with pytest.raises(jsonschema.ValidationError, match="containerz"):
        validate(service)
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "x"},
        "spec": {"selector": {}, "endpoints": [{"port": "http", "interval": 15}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def compose_validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_validate_against_the_compose_specification(path: Path) -> None:
    errors = sorted(compose_validator().iter_errors(yaml.safe_load(path.read_text())), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_schema_refuses_a_wrong_file() -> None:
    compose = yaml.safe_load(COMPOSE_FILES[0].read_text())
    compose["services"]["credence"]["depends_on"]["trainer"]["condition"] = "service_done"
    assert list(compose_validator().iter_errors(compose))


def test_compose_start_order_is_health_gated() -> None:
    services = yaml.safe_load(COMPOSE_FILES[0].read_text())["services"]
    after = {
        name: {dep: spec["condition"] for dep, spec in s.get("depends_on", {}).items()}
        for name, s in services.items()
    }
    assert after["credence"] == {"trainer": "service_completed_successfully"}
    assert after["prometheus"] == {"credence": "service_healthy"}
    assert after["grafana"] == {"prometheus": "service_healthy"}
    assert "healthcheck" in services["prometheus"]  # else service_healthy never comes
    gpu = yaml.safe_load(COMPOSE_FILES[1].read_text())["services"]["credence"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and gpu["environment"]["CREDENCE_DEVICE"] == "cuda"
