"""The container and Kubernetes files, checked without Docker: their commands are real r1kit commands,
their probes hit the real health route, and the resources are the seed's (§2.2)."""

import json
import re
from pathlib import Path

import pytest
import yaml

from r1kit.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def parse_serve(argv):
    assert argv[:2] == ["r1kit", "serve"], argv
    return build_parser("serve").parse_args(argv[1:])


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_run_the_server_they_expose(name):
    text = (DEPLOY / name).read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    args = parse_serve(cmd)
    assert args.host == "0.0.0.0" and f"EXPOSE {args.port}" in text
    assert f"http://localhost:{args.port}/health" in text
    assert re.search(r"^RUN pip install .*\.$", text, re.M), "installs the project as CI does (pip install from pyproject.toml)"
    if name == "Dockerfile":
        assert text.count("FROM nvidia/cuda:12.1") == 1 and args.device == "cuda"


def test_kubernetes_deployment_has_the_seed_resources_and_real_probes():
    deployment = yaml.safe_load((DEPLOY / "k8s" / "deployment.yaml").read_text())
    service = yaml.safe_load((DEPLOY / "k8s" / "service.yaml").read_text())
    assert deployment["kind"] == "Deployment" and service["kind"] == "Service"
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = parse_serve(container["args"])
    assert container["ports"][0]["containerPort"] == args.port == 8080
    res = container["resources"]
    assert res["limits"] == {"nvidia.com/gpu": 1, "memory": "32Gi"} and res["requests"] == {"cpu": "4", "memory": "16Gi"}
    live = container["livenessProbe"]
    assert live["exec"]["command"] == ["curl", "-f", f"http://localhost:{args.port}/health"] and live["initialDelaySeconds"] == 30
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert pod["spec"]["terminationGracePeriodSeconds"] > args.shutdown_timeout
    assert deployment["spec"]["selector"]["matchLabels"] == pod["metadata"]["labels"] == service["spec"]["selector"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
