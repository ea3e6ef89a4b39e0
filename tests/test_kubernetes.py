"""deploy/kubernetes/, checked offline: every object against the Kubernetes 1.37 schemas with
PyPI kubernetes-validate in strict mode (unknown fields refused), the ServiceMonitor against
the validators and TypeScript types generated from the Prometheus Operator's CRD schema (npm
@kubernetes-models/prometheus-operator, scripts/setup-servicemonitor-schema.sh; `tsc`
refuses unknown fields), and every
container against the server itself: its arguments parse with `sie-server`'s own parser, its
probe and scrape paths are routes of the Starlette app, its environment variables are ones
the server reads, and its grace period outlasts the drain."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from sie_server import cli, config
from sie_server.api import create_app
from sie_server.config import Settings
from sie_server.engine import Engine
from sie_server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
VERSION = "1.37.0"


def objects() -> list[tuple[str, dict]]:
    return [(f.name, doc) for f in sorted(K8S.glob("*.yaml"))
            for doc in yaml.safe_load_all(f.read_text()) if doc]


def by_kind(kind: str) -> list[dict]:
    return [o for _, o in objects() if o["kind"] == kind]


def containers() -> list[tuple[dict, dict]]:
    return [(d, c) for d in by_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]]


@pytest.fixture(scope="module")
def routes() -> set[str]:
    engine = Engine(Settings(default_models=[], device="cpu"))
    try:
        return {r.path for r in create_app(engine).routes}
    finally:
        engine.close()


def test_the_expected_objects_are_there() -> None:
    kinds = sorted(o["kind"] for _, o in objects())
    assert kinds == ["Deployment", "Deployment", "HorizontalPodAutoscaler",
                     "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service",
                     "ServiceMonitor"], kinds


def test_objects_pass_strict_kubernetes_schemas() -> None:
    for name, obj in objects():
        if obj["kind"] == "ServiceMonitor":
            continue
        kubernetes_validate.validate(obj, VERSION, strict=True)
    # the check can fail: an unknown field is refused
    bad = copy.deepcopy(by_kind("Deployment")[0])
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def check_servicemonitor(node_dir: Path, obj: dict) -> subprocess.CompletedProcess:
    script = (ROOT / "tests" / "check_servicemonitor.mjs").read_text()
    return subprocess.run(["node", "--input-type=module", "-e", script], cwd=node_dir,
                          input=json.dumps(obj), capture_output=True, text=True, timeout=60)


def typecheck_servicemonitor(node_dir: Path, obj: dict) -> subprocess.CompletedProcess:
    """`tsc` on the object as a literal of the CRD's generated type: TypeScript refuses a
    property the type does not have, at any depth."""
    source = node_dir / f"check-{os.getpid()}.ts"
    source.write_text('import type { IServiceMonitor } from "@kubernetes-models/prometheus-operator'
                      '/monitoring.coreos.com/v1/ServiceMonitor";\n'
                      f"export const monitor: IServiceMonitor = {json.dumps(obj, indent=1)};\n")
    try:
        return subprocess.run([str(node_dir / "node_modules/.bin/tsc"), "--noEmit", "--strict",
                               "--module", "nodenext", "--moduleResolution", "nodenext",
                               "--skipLibCheck", source.name], cwd=node_dir,
                              capture_output=True, text=True, timeout=120)
    finally:
        source.unlink()


def test_servicemonitor_passes_the_prometheus_operator_crd_schema() -> None:
    setup = subprocess.run([str(ROOT / "scripts" / "setup-servicemonitor-schema.sh")],
                           capture_output=True, text=True, timeout=300)
    if setup.returncode == 3:
        pytest.skip(f"no node/npm: {setup.stderr.strip()}")
    assert setup.returncode == 0, setup.stderr
    node_dir = Path(setup.stdout.strip())
    (monitor,) = by_kind("ServiceMonitor")
    r = check_servicemonitor(node_dir, monitor)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
    r = typecheck_servicemonitor(node_dir, monitor)
    assert r.returncode == 0, r.stdout + r.stderr
    # the checks can fail: a malformed value, an unknown field
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert check_servicemonitor(node_dir, bad).returncode == 1
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["scrapeTimout"] = "10s"
    r = typecheck_servicemonitor(node_dir, bad)
    assert r.returncode != 0 and "'\"scrapeTimout\"' does not exist" in r.stdout, r.stdout


def test_containers_use_only_the_servers_flags_and_variables() -> None:
    parser = cli.parser()
    known_env = set(re.findall(r'"(SIE_[A-Z_]+)"', Path(config.__file__).read_text()))
    for deployment, c in containers():
        assert c["command"][:2] == ["sie-server", "serve"], deployment["metadata"]["name"]
        try:
            args = parser.parse_args([*c["command"][1:], *c["args"]])
        except SystemExit:
            pytest.fail(f"{deployment['metadata']['name']}: sie-server refuses {c['args']}")
        port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
        assert args.port == port
        for mount in c["volumeMounts"]:
            assert mount["name"] in {v["name"] for v in deployment["spec"]["template"]["spec"]["volumes"]}
        models = [m for m in c["volumeMounts"] if m["name"] == "models"]
        assert models and all(str(s).startswith(models[0]["mountPath"]) for _, s in args.model)
        for var in c["env"]:
            assert var["name"] in known_env or var["name"] == "HF_HUB_OFFLINE", var["name"]
    # the check can fail: a flag the server does not have
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--no-such-flag=1"])


def test_probe_and_scrape_paths_are_server_routes(routes: set[str]) -> None:
    for _, c in containers():
        probes = [c[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe", "readinessProbe")]
        assert set(probes) <= routes, probes
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    (monitor,) = by_kind("ServiceMonitor")
    assert {e["path"] for e in monitor["spec"]["endpoints"]} <= routes
    assert "/no-such-path" not in routes


def test_grace_period_outlasts_prestop_and_drain() -> None:
    for deployment, c in containers():
        pod = deployment["spec"]["template"]["spec"]
        pause = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert pod["terminationGracePeriodSeconds"] > pause + cli.DRAIN_TIMEOUT_S


def test_objects_point_at_each_other() -> None:
    (service,) = by_kind("Service")
    (monitor,) = by_kind("ServiceMonitor")
    (pdb,) = by_kind("PodDisruptionBudget")
    deployments = {d["metadata"]["name"]: d for d in by_kind("Deployment")}
    for d in deployments.values():
        pod_labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= set(ports)
    assert all(p["targetPort"] == "http" for p in ports.values())
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    for hpa in by_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    secrets = {v["valueFrom"]["secretKeyRef"]["name"] for _, c in containers() for v in c["env"]
               if "valueFrom" in v}
    assert {e["authorization"]["credentials"]["name"] for e in monitor["spec"]["endpoints"]} <= secrets
    # the HPA's custom metric is one the server exports
    exported = {m.name for m in Metrics().registry.collect()}
    for hpa in by_kind("HorizontalPodAutoscaler"):
        for metric in hpa["spec"]["metrics"]:
            if metric["type"] == "Pods":
                assert metric["pods"]["metric"]["name"] in exported
