"""deploy/observability/ against a real Prometheus (Debian package `prometheus`, installed by
scripts/setup-apt.sh): promtool accepts the shipped config and rules; a Prometheus started on
127.0.0.1 with the shipped scrape jobs scrapes real server processes under a short load; every
dashboard panel's query returns data and every alert is made to fire by causing its condition.

The test copy of the config changes only what a test must: the targets, a 1 s scrape and
evaluation interval, and `for: 0s` on every rule (the shipped `for:` values are minutes).
The `sie-ray` job scrapes a second server process: a Ray replica's metrics port serves the
same engine registry (ray/serve.py), which test_ray.py checks."""

from __future__ import annotations

import concurrent.futures
import json
import math
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import free_port
from texts import SHORT_TEXTS

from sie_server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
OBS = ROOT / "deploy" / "observability"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
needs_prometheus = pytest.mark.skipif(
    not (PROMETHEUS and PROMTOOL),
    reason="Debian package prometheus is not installed (scripts/setup-apt.sh installs it)")
# Grafana's own variables, as Grafana would fill them for "All" over a 5-minute range
GRAFANA_VARS = {"$__rate_interval": "5m", "$job": ".+", "$instance": ".+"}


def dashboard() -> dict:
    return json.loads((OBS / "grafana-dashboard.json").read_text())


def panel_queries() -> list[tuple[str, str]]:
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append((f"{panel['title']} / {target['refId']}", expr))
    return out


def test_dashboard_is_well_formed_and_covers_every_metric() -> None:
    dash = dashboard()
    panels = dash["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert dash["uid"] and dash["schemaVersion"] >= 36
    for p in panels:
        assert set(p["gridPos"]) == {"h", "w", "x", "y"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        if p["type"] == "row":
            continue
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(set(refs)) == len(refs), p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"]), p["title"]
    assert "$" not in "".join(q for _, q in panel_queries()), "a Grafana variable the test does not fill"
    used = " ".join(q for _, q in panel_queries())
    exported = {m.name for m in Metrics().registry.collect()}
    assert exported, "no metrics"
    missing = {name for name in exported if not re.search(rf"\b{name}(_total|_bucket|_sum|_count)?\b", used)}
    assert not missing, f"metrics with no panel: {missing}"
    unknown = {n for n in re.findall(r"\b(sie_\w+)", used)
               if re.sub(r"_(total|bucket|sum|count)$", "", n) not in exported}
    assert not unknown, f"panels query metrics the server does not export: {unknown}"


@needs_prometheus
def test_promtool_accepts_the_config_and_rules_and_their_unit_tests_pass() -> None:
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "alerts.yml"],
                 ["test", "rules", "alerts-test.yml"]):  # the real `for:` durations
        r = subprocess.run([PROMTOOL, *args], cwd=OBS, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    rules = yaml.safe_load((OBS / "alerts.yml").read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {"SIEHighErrorRatio", "SIEQueueFull", "SIEHighP99Latency",
                                            "SIEModelLoadFailed", "SIEServerDown", "SIEReplicaDown"}


class Prometheus:
    """A Prometheus process on 127.0.0.1 with its own config and storage folder."""

    def __init__(self, folder: Path, targets: dict[str, list[str]]) -> None:
        shipped = yaml.safe_load((OBS / "prometheus.yml").read_text())
        assert {j["job_name"] for j in shipped["scrape_configs"]} == set(targets)
        rules = yaml.safe_load((OBS / "alerts.yml").read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["for"] = "0s"
        (folder / "alerts.yml").write_text(yaml.safe_dump(rules))
        config = {**shipped, "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                                        "evaluation_interval": "1s"},
                  "rule_files": [str(folder / "alerts.yml")]}
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": targets[job["job_name"]]}]
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = open(folder / "prometheus.log", "w+")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={folder / 'prometheus.yml'}",
             f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait(lambda: httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200, 60,
                  "Prometheus ready")

    def wait(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if check():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}\n{self.output()[-3000:]}")

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        assert r.status_code == 200, (expr, r.text)
        return r.json()["data"]["result"]

    def firing(self) -> dict[str, list[dict]]:
        alerts = httpx.get(f"{self.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
        out: dict[str, list[dict]] = {}
        for a in alerts:
            if a["state"] == "firing":
                out.setdefault(a["labels"]["alertname"], []).append(a["labels"])
        return out

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def slow_upload(port: int, seconds: float) -> int:
    """One encode request whose body arrives over `seconds` (a slow client: the latency the
    server measures, request start to response end, includes it); returns the status."""
    body = json.dumps({"items": [{"text": "a slow client"}]}).encode()
    head = (f"POST /v1/encode/{MINILM} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    parts = 7
    step = math.ceil(len(body) / parts)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head.encode())
        for i in range(parts):
            time.sleep(seconds / parts)
            s.sendall(body[i * step:(i + 1) * step])
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


# panels of events that the load below causes: each must show more than zero
EVENTS = ("Requests by", "Errors", "5xx ratio", "Refusals", "Total request latency",
          "Queue wait", "Tokenization", "Inference", "Batch size", "Tokens through",
          "Models loaded", "Memory per model / A", "Model loads", "Adapter loads", "Evictions",
          "Targets up")


def broken_model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{ not json")
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"garbage")
    (folder / "modules.json").write_text("[]")
    return folder


@pytest.mark.slow
@needs_prometheus
def test_prometheus_scrapes_servers_panels_have_data_and_alerts_fire(
        start_server, tmp_path: Path, minilm_dir: Path) -> None:
    from lora_adapters import make_adapter

    make_adapter(minilm_dir, tmp_path / "adapters/team/a1", r=4, targets=["query", "value"],
                 seed=1)
    weights = (minilm_dir / "model.safetensors").stat().st_size
    server = start_server([
        "--model", f"broken/model={broken_model(tmp_path / 'broken')}",
        "--model", f"mini/a={minilm_dir}", "--model", f"mini/b={minilm_dir}",
        "--adapter-root", str(tmp_path / "adapters"), "--load-retry-cooldown", "1",
        "--memory-budget-bytes", str(int(weights * 1.5)),  # one MiniLM copy at a time
        "--max-queued-tokens", "600", "--max-batch-tokens", "256"])
    replica = start_server([])  # stands in for a Ray replica's metrics port
    folder = tmp_path / "prometheus"
    folder.mkdir()
    prom = Prometheus(folder, {"sie": [server.url.removeprefix("http://")],
                               "sie-ray": [replica.url.removeprefix("http://")]})
    try:
        prom.wait(lambda: len([r for r in prom.query("up") if r["value"][1] == "1"]) == 2, 60,
                  "both targets up")
        load(server, replica)
        time.sleep(3)  # the last scrapes

        empty, still = [], []
        for title, expr in panel_queries():
            values = [float(r["value"][1]) for r in prom.query(expr)]
            if not any(math.isfinite(v) for v in values):
                empty.append((title, expr, values))
            elif title.startswith(EVENTS) and not max(v for v in values if math.isfinite(v)) > 0:
                still.append((title, expr, values))
        assert not empty, f"panels without data: {empty}"
        assert not still, f"panels of events the load caused that show none: {still}"

        wanted = {"SIEHighErrorRatio", "SIEQueueFull", "SIEHighP99Latency", "SIEModelLoadFailed"}
        prom.wait(lambda: wanted <= set(prom.firing()), 60, f"alerts {wanted} firing")
        firing = prom.firing()
        # broken/model answers only 502; MiniLM's QUEUE_FULL 503s may count too
        assert "broken/model" in {a["model"] for a in firing["SIEHighErrorRatio"]}
        assert {a["model"] for a in firing["SIEModelLoadFailed"]} == {"broken/model"}
        assert {a["model"] for a in firing["SIEQueueFull"]} == {MINILM}
        assert {a["route"] for a in firing["SIEHighP99Latency"]} == {"encode"}

        # the down alerts name the target that stopped (a scrape that times out on a busy
        # machine may fire them for a moment: their shipped `for:` is 2 minutes)
        for job, target in (("sie-ray", replica), ("sie", server)):
            instance = target.url.removeprefix("http://")
            target.stop()
            alert = "SIEReplicaDown" if job == "sie-ray" else "SIEServerDown"
            prom.wait(lambda: {"job": job, "instance": instance, "alertname": alert,
                               "severity": "critical"} in prom.firing().get(alert, []),
                      30, f"{alert} for {instance}")
    finally:
        prom.stop()


def load(server, replica) -> None:
    """A short mixed load: every route and event the panels and alerts show."""
    url = server.url
    encode = f"{url}/v1/encode/{MINILM}"
    slow = concurrent.futures.ThreadPoolExecutor(8)
    slow_calls = [slow.submit(slow_upload, server.port, 6.5) for _ in range(8)]

    def broken_calls() -> None:  # a failed load, 502s, a retried load after each cool-down
        for _ in range(8):
            r = httpx.post(f"{url}/v1/encode/broken/model", json={"items": [{"text": "x"}]})
            assert r.status_code == 502, r.text
            time.sleep(0.6)

    broken = threading.Thread(target=broken_calls)
    broken.start()
    with httpx.Client(timeout=60) as c:
        for text in SHORT_TEXTS[:20]:
            assert c.post(encode, json={"items": [{"text": text}]}).status_code == 200
            assert c.post(f"{replica.url}/v1/encode/{MINILM}",
                          json={"items": [{"text": text}]}).status_code == 200
        r = c.post(encode, json={"items": [{"text": "tuned"}], "params": {"options": {"lora_id": "team/a1"}}})
        assert r.status_code == 200, r.text
        r = c.delete(f"{url}/v1/models/{MINILM}/adapters/team/a1")
        assert r.status_code == 200, r.text
        assert c.post(f"{url}/v1/embeddings", json={"model": MINILM, "input": ["hi"]}).status_code == 200
        assert c.post(f"{url}/v1/encode/no/such-model", json={"items": [{"text": "x"}]}).status_code == 404
        too_large = [{"text": "word " * 100}] * 10  # ~1,000 tokens, over the queue's 600
        assert c.post(encode, json={"items": too_large}).status_code == 413

    def burst(i: int) -> int:  # 4x the work the queue takes: some are refused
        chunk = [{"text": SHORT_TEXTS[(i + k) % 40]} for k in range(8)]
        return httpx.post(encode, json={"items": chunk}, timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(burst, range(128)))
    assert 503 in statuses and 200 in statuses, statuses
    for model in ("mini/a", "mini/b", "mini/a"):  # each load evicts the other copy
        r = httpx.post(f"{url}/v1/encode/{model}", json={"items": [{"text": "x"}]}, timeout=60)
        assert r.status_code == 200, r.text
    broken.join()
    assert [f.result() for f in slow_calls] == [200] * 8
    slow.shutdown()
