"""Kubernetes manifests: rendered with kustomize (kubectl's), core kinds validated by kubernetes-validate,
the KEDA ScaledObject against the ScaledObject CRD's schema (tests/deploy/schemas, derived from KEDA's CRD)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import find_tool
from tests.integration.server import REPO_ROOT

OVERLAYS = ("base", "gpu")
KEDA_SCHEMA = Path(__file__).parent / "schemas" / "keda-scaledobject-v1alpha1.json"
# The trigger metadata keys KEDA's Prometheus scaler reads (pkg/scalers/prometheus_scaler.go).
PROMETHEUS_SCALER_KEYS = {"serverAddress", "query", "queryParameters", "threshold", "activationThreshold",
                          "namespace", "customHeaders", "ignoreNullValues", "unsafeSsl", "awsRegion", "timeout",
                          "identityOwner"}


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = find_tool("kubectl")
    output = subprocess.run([kubectl, "kustomize", str(REPO_ROOT / "deploy" / "k8s" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert output.returncode == 0, output.stderr
    return [document for document in yaml.safe_load_all(output.stdout) if document]


def by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [document for document in documents if document["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_kinds_pass_kubernetes_validate(overlay: str, tmp_path: Path) -> None:
    validator = find_tool("kubernetes-validate")
    core = [document for document in render(overlay) if not document["apiVersion"].startswith("keda.sh/")]
    assert {document["kind"] for document in core} == {"Namespace", "Deployment", "Service"}
    for document in core:
        path = tmp_path / f"{document['kind'].lower()}.yaml"
        path.write_text(yaml.safe_dump(document))
        result = subprocess.run([validator, "--strict", str(path)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "passed" in result.stdout + result.stderr


def strict_copy(schema: Any) -> Any:
    """kubectl's strict field validation: no field the CRD does not name, except where the CRD
    keeps unknown fields or declares a map (additionalProperties)."""
    if isinstance(schema, dict):
        copied = {key: strict_copy(value) for key, value in schema.items()}
        if ("properties" in copied and "additionalProperties" not in copied
                and not copied.get("x-kubernetes-preserve-unknown-fields")):
            copied["additionalProperties"] = False
        return copied
    if isinstance(schema, list):
        return [strict_copy(item) for item in schema]
    return schema


def validate_scaled_object(document: dict[str, Any]) -> None:
    schema = strict_copy(json.loads(KEDA_SCHEMA.read_text()))
    schema["properties"]["metadata"] = {"type": "object"}
    jsonschema.Draft7Validator(schema).validate(document)
    spec = document["spec"]
    # The CRD's x-kubernetes-validations rule, which JSON Schema cannot express.
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scaled_object_matches_the_keda_crd_schema(overlay: str) -> None:
    documents = render(overlay)
    scaled_object = by_kind(documents, "ScaledObject")
    assert scaled_object["apiVersion"] == "keda.sh/v1alpha1"
    validate_scaled_object(scaled_object)
    deployment = by_kind(documents, "Deployment")
    assert scaled_object["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert scaled_object["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    triggers = scaled_object["spec"]["triggers"]
    assert {trigger["type"] for trigger in triggers} == {"prometheus"}
    for trigger in triggers:
        metadata = trigger["metadata"]
        assert set(metadata) <= PROMETHEUS_SCALER_KEYS, set(metadata) - PROMETHEUS_SCALER_KEYS
        assert "genserve_requests_waiting" in metadata["query"]
        assert float(metadata["threshold"]) >= 1
    assert {trigger["name"] for trigger in triggers} == {"autoregressive-waiting", "diffusion-waiting"}


def test_the_schema_rejects_what_keda_would() -> None:
    good = by_kind(render("base"), "ScaledObject")
    validate_scaled_object(good)
    numeric_threshold = json.loads(json.dumps(good))
    numeric_threshold["spec"]["triggers"][0]["metadata"]["threshold"] = 56  # metadata is a map of strings
    misspelled = json.loads(json.dumps(good))
    misspelled["spec"]["maxReplicas"] = misspelled["spec"].pop("maxReplicaCount")
    no_target = json.loads(json.dumps(good))
    del no_target["spec"]["scaleTargetRef"]
    for broken in (numeric_threshold, misspelled, no_target):
        with pytest.raises(jsonschema.ValidationError):
            validate_scaled_object(broken)
    inverted = json.loads(json.dumps(good))
    inverted["spec"]["minReplicaCount"] = 9
    with pytest.raises(AssertionError):
        validate_scaled_object(inverted)


def container(documents: list[dict[str, Any]]) -> dict[str, Any]:
    containers = by_kind(documents, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_resources_and_scraping(overlay: str) -> None:
    documents = render(overlay)
    deployment = by_kind(documents, "Deployment")
    server = container(documents)
    assert server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    assert server["resources"]["requests"]["cpu"] == server["resources"]["limits"]["cpu"]
    assert "memory" in server["resources"]["limits"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    port = int(annotations["prometheus.io/port"])
    assert port in {entry["containerPort"] for entry in server["ports"]}
    service = by_kind(documents, "Service")
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    environment = {entry["name"]: entry.get("value") for entry in server.get("env", [])}
    if overlay == "gpu":
        assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert server["image"].endswith(":cuda")
        assert environment["GENSERVE_DEVICE"] == "cuda"
    else:
        assert "nvidia.com/gpu" not in server["resources"]["limits"]
        assert server["image"].endswith(":cpu")
