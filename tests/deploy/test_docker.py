"""The Dockerfile through hadolint, the compose files through the compose specification's JSON schema,
and the facts both must keep (no Docker engine here: building and running are in docs/deploy.md)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from tests.deploy.conftest import find_tool
from tests.integration.server import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "docker-compose.yml"
GPU_OVERRIDE = REPO_ROOT / "deploy" / "docker-compose.gpu.yml"


def test_hadolint_has_no_findings() -> None:
    # No rule is ignored: any finding, down to "info" and "style", fails.
    result = subprocess.run([find_tool("hadolint"), "--failure-threshold", "style", "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install torch\nCMD python -m service\n")
    result = subprocess.run([find_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image


def instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_contract() -> None:
    steps = instructions(DOCKERFILE.read_text())
    stages = [argument for instruction, argument in steps if instruction == "FROM"]
    assert len(stages) >= 2, "multi-stage"
    final_stage = steps[max(index for index, (instruction, _) in enumerate(steps) if instruction == "FROM"):]
    final = dict(final_stage)
    assert json.loads(final["ENTRYPOINT"]) == ["python", "-m", "service", "--host", "0.0.0.0"]
    assert json.loads(final["CMD"]) == []  # `docker run IMAGE --max-batch-size 64` appends flags
    assert re.fullmatch(r"\d+(:\d+)?", final["USER"]) and not final["USER"].startswith("0")
    assert "/ready" in final["HEALTHCHECK"]
    copied = " ".join(argument for instruction, argument in final_stage if instruction == "COPY")
    assert "models/tiny-shakespeare" in copied and "models/tiny-digits" in copied
    build_args = [argument.split("=")[0] for instruction, argument in steps if instruction == "ARG"]
    assert "TORCH_VARIANT" in build_args
    default_variant = next(argument for instruction, argument in steps
                           if instruction == "ARG" and argument.startswith("TORCH_VARIANT="))
    assert default_variant == "TORCH_VARIANT=cpu"


def test_dockerignore_lets_in_what_the_image_copies() -> None:
    lines = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "an allow-list: everything else stays out of the build context"
    from_context = [line for line in DOCKERFILE.read_text().splitlines()
                    if line.startswith("COPY ") and "--from=" not in line]
    assert len(from_context) == 4
    for line in from_context:
        source = line.split()[-2]
        assert f"!{source.rstrip('/')}/" in lines or f"!{source}" in lines, source
        assert (REPO_ROOT / source).exists(), source


def test_compose_files_match_the_compose_specification() -> None:
    result = subprocess.run([find_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                             str(COMPOSE), str(GPU_OVERRIDE)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_would_catch_a_mistake(tmp_path: Path) -> None:
    broken = yaml.safe_load(COMPOSE.read_text())
    broken["services"]["prometheus"]["depends_on"]["genserve"]["condition"] = "service_ready"
    path = tmp_path / "compose.yml"
    path.write_text(yaml.safe_dump(broken))
    result = subprocess.run([find_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0


def test_compose_wiring() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"genserve", "prometheus", "grafana"}
    assert services["prometheus"]["depends_on"]["genserve"]["condition"] == "service_healthy"
    assert "/ready" in " ".join(services["genserve"]["healthcheck"]["test"])
    assert set(compose["volumes"]) == {"prometheus-data", "grafana-data"}
    mounts = {service: services[service]["volumes"] for service in ("prometheus", "grafana")}
    assert "prometheus-data:/prometheus" in mounts["prometheus"]
    assert "grafana-data:/var/lib/grafana" in mounts["grafana"]
    # Prometheus reads this repo's config; Grafana this repo's provisioning and dashboards.
    assert "./deploy/prometheus:/etc/prometheus:ro" in mounts["prometheus"]
    prometheus_config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = prometheus_config["scrape_configs"][0]
    assert job["scrape_interval"] == "5s"
    assert job["static_configs"][0]["targets"] == ["genserve:8000"]
    datasource = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    dashboard = json.loads((REPO_ROOT / "deploy/grafana/dashboards/genserve.json").read_text())
    used_uids = {panel["datasource"]["uid"] for panel in dashboard["panels"] if "datasource" in panel}
    assert used_uids == {datasource["datasources"][0]["uid"]}
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/dashboards/genserve.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert f"./deploy/grafana/dashboards:{dashboards_path}:ro" in mounts["grafana"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts["grafana"]


def test_gpu_override_reserves_a_gpu_and_builds_the_cuda_variant() -> None:
    override = yaml.safe_load(GPU_OVERRIDE.read_text())["services"]["genserve"]
    devices = override["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert override["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert override["environment"]["GENSERVE_DEVICE"] == "cuda"
