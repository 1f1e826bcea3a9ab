"""The deployment files as data: kustomize output, compose files, the KServe service, the
Dockerfile's instructions, and the vendored schemas of the custom resources (deploy/schemas/)."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = {
    "base": DEPLOY / "kubernetes" / "base",
    "gpu": DEPLOY / "kubernetes" / "overlays" / "gpu",
}
KSERVE = DEPLOY / "kserve" / "inferenceservice.yaml"
COMPOSE_FILES = (ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml")
SCHEMAS = DEPLOY / "schemas"
# apiVersion/kind -> the vendored openAPIV3Schema of its CRD
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    (
        "serving.kserve.io/v1beta1",
        "InferenceService",
    ): "inferenceservice-serving.kserve.io-v1beta1.json.gz",
}
KUBECTL = shutil.which("kubectl")


def render(kustomization: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize` (kustomize built into kubectl): the objects `kubectl apply -k`
    would send, as dicts."""
    assert KUBECTL, "kubectl is not installed"
    done = subprocess.run(
        [KUBECTL, "kustomize", str(kustomization)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft4Validator:
    """A CRD's schema (OpenAPI v3, a JSON Schema draft 4 dialect) made strict as
    `kubectl apply --validate=strict` is: an object that lists its properties admits no
    others, unless it preserves unknown fields."""
    path = SCHEMAS / CRD_SCHEMAS[(api_version, kind)]
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return jsonschema.Draft4Validator(_strict(json.loads(raw)))


def _strict(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [(w.upper(), rest.strip()) for w, _, rest in (x.strip().partition(" ") for x in lines)]


def dockerfile_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """Every KEY=VALUE of the image's ENV lines (values without quotes or spaces here)."""
    env: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ENV":
            env.update(item.split("=", 1) for item in rest.split())
    return env


CREDENCE_NAME = re.compile(r"\bCREDENCE_[A-Z0-9_]+\b")


def credence_names(text: str) -> set[str]:
    return set(CREDENCE_NAME.findall(text))
