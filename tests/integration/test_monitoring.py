"""Metrics a real Prometheus scrapes: the demo's tiny model served through the deploy flow (test_deploy's
helpers: real nginx, `transformers serve`, Prefect, MLflow), Debian's Prometheus on a loopback port scraping
the scrape config `gauntlet deploy` wrote, and its HTTP API asked for the stable version's request count and
p95 latency. Skipped, saying why, where nginx or Prometheus is not installed (.ci/run installs both as root).
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from gauntlet.deploy.router import nginx_binary
from tests.integration.test_deploy import PROMPTS, mlflow_client, models, register, run_flow, spec  # noqa: F401

PROMETHEUS = shutil.which("prometheus")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (apt-get install nginx; "
                                                                 ".ci/run installs it where it runs as root)"),
              pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus;"
                                                            " .ci/run installs it where it runs as root)")]
REQUESTS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def wait_for(what: str, check, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"Prometheus never saw {what}")
        time.sleep(0.5)


def start_prometheus(fragment: Path, tmp_path: Path, procs: list, **more) -> int:
    """Debian's Prometheus on a free loopback port, scraping what the scrape fragment ``gauntlet deploy`` wrote
    every second (``more``: further top-level settings, e.g. rule_files and alerting); returns its port."""
    configs = yaml.safe_load(fragment.read_text())["scrape_configs"]
    for c in configs:
        c["scrape_interval"] = "1s"
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                                      "scrape_configs": configs, **more}))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        procs.append(subprocess.Popen([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path}/tsdb",
                                       f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log))
    wait_for("its own API", lambda: _answers(port), 60)
    return port


@pytest.fixture()
def prometheus(tmp_path):
    procs: list[subprocess.Popen] = []
    yield lambda fragment: start_prometheus(fragment, tmp_path, procs)
    for p in procs:
        p.terminate()
        p.wait(30)


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_prometheus_scrapes_the_stable_versions_requests_and_p95(models, prefect_api, prometheus,  # noqa: F811
                                                                 tmp_path) -> None:
    from gauntlet.deploy.rollout import folder_of, load_state, stop_all
    from gauntlet.deploy.servers import chat, pid_alive

    c = mlflow_client()
    name = f"deploy-watched-{uuid.uuid4().hex[:6]}"
    s = spec()
    try:
        version = register(c, name, models["a"])
        assert "serves" in run_flow(name, s, tmp_path)           # first deploy: v1 serves as stable
        state = load_state(name)
        fragment = folder_of(name) / "prometheus.yml"
        port = prometheus(fragment)
        target = f'deployment="{name}"'
        wait_for("the exporter up", lambda: [r for r in query(port, f"up{{{target}}}") if r["value"][1] == "1"])
        wait_for("the stable series at 0", lambda: query(
            port, f'gauntlet_router_request_duration_seconds_count{{{target},slot="stable"}}'))
        for i in range(REQUESTS):
            chat(f"http://127.0.0.1:{state.router_port}", name, PROMPTS[i % len(PROMPTS)], 4)
        count = f'sum(gauntlet_router_requests_total{{{target},slot="stable",version="{version}",code="200"}})'
        got = wait_for(f"{REQUESTS} requests", lambda: [r for r in query(port, count)
                                                        if float(r["value"][1]) >= REQUESTS])
        assert float(got[0]["value"][1]) == REQUESTS, got
        p95 = (f"histogram_quantile(0.95, sum by (le) (rate(gauntlet_router_request_duration_seconds_bucket"
               f'{{{target},slot="stable",version="{version}"}}[1m])))')
        result = wait_for("a p95", lambda: [r for r in query(port, p95) if not math.isnan(float(r["value"][1]))])
        assert 0 < float(result[0]["value"][1]) <= 300, result
        memory = query(port, f'gauntlet_server_resident_memory_bytes{{{target},slot="stable",version="{version}"}}')
        assert memory and float(memory[0]["value"][1]) > 10_000_000, memory   # a Python with torch loaded
    finally:
        stop_all(name)
    exporter = json.loads((folder_of(name) / "metrics" / "exporter.json").read_text())
    assert not pid_alive(exporter["pid"]), "gauntlet deploy stop leaves no exporter running"
