"""Every deployment file agrees with the server it deploys: each CREDENCE_* name is a field of
service.settings.Settings and each value is one it accepts; ports, probe and scrape paths are
the app's own; the entrypoint is the package's script; the stop sequence fits the drain."""

from __future__ import annotations

import re
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml
from deploy_files import (
    COMPOSE_FILES,
    DEPLOY,
    KSERVE,
    KUBECTL,
    KUSTOMIZATIONS,
    ROOT,
    credence_names,
    dockerfile_env,
    dockerfile_instructions,
    load_yaml_docs,
    render,
)

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings

FIELDS = {f"CREDENCE_{name.upper()}" for name in Settings.model_fields}
DEFAULT_PORT = Settings.model_fields["port"].default
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl (kustomize) not installed")


def deployment_files() -> list[Path]:
    files = [ROOT / "Dockerfile", *COMPOSE_FILES, KSERVE]
    kubernetes = DEPLOY / "kubernetes"
    return [*files, *sorted(kubernetes.rglob("*.yaml")), *sorted(kubernetes.rglob("*.env"))]


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings a server started with these variables gets (it refuses bad values)."""
    names = set(env) & FIELDS
    return Settings(**{name.removeprefix("CREDENCE_").lower(): env[name] for name in names})


@cache
def app_paths() -> frozenset[str]:
    """The GET paths of the app's own routes (every protocol's router included)."""
    schema = create_app(Settings()).openapi()["paths"]
    return frozenset(path for path, methods in schema.items() if "get" in methods)


@pytest.mark.parametrize("path", deployment_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_credence_name_is_a_setting(path: Path) -> None:
    unknown = credence_names(path.read_text()) - FIELDS
    assert not unknown, f"{path.name} names {sorted(unknown)}, which Settings does not have"


def test_the_check_catches_a_misspelt_name() -> None:
    assert credence_names("CREDENCE_MAX_QUEUE=3 CREDENCE_MAXQUEUE=3") - FIELDS == {
        "CREDENCE_MAXQUEUE"
    }


def test_dockerfile_agrees_with_the_server() -> None:
    instructions = dockerfile_instructions()
    env = dockerfile_env(instructions)
    settings = settings_from(env)
    assert settings.port == DEFAULT_PORT and str(settings.model_dir) == "/models"
    last = {word: rest for word, rest in instructions}  # the runtime stage's
    assert last["EXPOSE"] == str(settings.port)
    assert last["VOLUME"] == f'["{settings.model_dir}"]'
    assert "/healthz" in last["HEALTHCHECK"] and "/healthz" in app_paths()
    assert "CREDENCE_PORT" in last["HEALTHCHECK"]  # checks the port the server listens on
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert last["ENTRYPOINT"] == '["credence-serve"]' and scripts["credence-serve"] == (
        "service.cli:main"
    )
    assert last["USER"].split(":")[0] != "0"


def test_compose_agrees_with_the_server() -> None:
    compose = yaml.safe_load(COMPOSE_FILES[0].read_text())
    services = compose["services"]
    credence = services["credence"]
    settings = settings_from(credence["environment"])
    (mapping,) = credence["ports"]
    assert mapping.split(":")[-1] == str(settings.port)
    assert any(v.endswith(f":{settings.model_dir}:ro") for v in credence["volumes"])
    trainer = services["trainer"]
    assert any(v.endswith(f":{settings.model_dir}") for v in trainer["volumes"])
    assert f"--out {settings.model_dir}" in trainer["command"][0]
    grace = int(credence["stop_grace_period"].removesuffix("s"))
    assert grace > settings.shutdown_grace_s  # compose waits out the drain before SIGKILL
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"credence:{settings.port}"]
    assert job["metrics_path"] in app_paths()
    gpu = yaml.safe_load(COMPOSE_FILES[1].read_text())["services"]["credence"]
    settings_from({**credence["environment"], **gpu["environment"]})


def probe_paths(container: dict) -> dict[str, str]:
    return {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe")
        if probe in container
    }


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kubernetes_agrees_with_the_server(name: str) -> None:
    docs = {d["kind"]: d for d in render(KUSTOMIZATIONS[name])}
    settings = settings_from(docs["ConfigMap"]["data"])
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port
    assert {p["targetPort"] for p in docs["Service"]["spec"]["ports"]} == {port["name"]}
    paths = probe_paths(container)
    assert paths["livenessProbe"] == "/healthz" and paths["readinessProbe"] == "/readyz"
    assert set(paths.values()) <= app_paths()
    assert all(container[p]["httpGet"]["port"] == port["name"] for p in paths)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[str(settings.model_dir)]["readOnly"]
    # the pod stops: preStop, then SIGTERM and the drain; SIGKILL only after both
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + settings.shutdown_grace_s
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    # whole CPUs, requests = limits: the cgroup quota the server reads is that many cores,
    # and a numeric batch_workers fits in them
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    cpus = int(resources["limits"]["cpu"])
    assert settings.batch_workers == "auto" or settings.batch_workers <= cpus
    (endpoint,) = docs["ServiceMonitor"]["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] in app_paths()
    served = {metric.name for metric in Metrics().registry.collect()}
    for metric in docs["HorizontalPodAutoscaler"]["spec"]["metrics"]:
        if metric["type"] == "Pods":
            assert metric["pods"]["metric"]["name"] in served
    (policy_port,) = docs["NetworkPolicy"]["spec"]["ingress"][0]["ports"]
    assert policy_port["port"] == port["name"]


def test_prometheus_adapter_rule_serves_a_real_series() -> None:
    rules = yaml.safe_load((DEPLOY / "kubernetes" / "prometheus-adapter-rules.yaml").read_text())
    (rule,) = rules["rules"]["custom"]
    series = re.match(r"[a-z_]+", rule["seriesQuery"]).group(0)
    assert series in {metric.name for metric in Metrics().registry.collect()}


def test_kserve_agrees_with_the_server() -> None:
    (service,) = load_yaml_docs(KSERVE)
    (container,) = service["spec"]["predictor"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = settings_from(env)
    assert str(settings.model_dir) == "/mnt/models"  # where KServe puts STORAGE_URI
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port
    paths = probe_paths(container)
    assert set(paths.values()) <= app_paths() and "/v2/health/ready" in paths.values()
    assert all(container[p]["httpGet"]["port"] == settings.port for p in paths)
