"""Alarms for real: the demo's tiny model served through the deploy flow (test_deploy's helpers), Debian's
Prometheus evaluating the alerts.yml `gauntlet deploy` wrote (1 s scrapes and evaluations) and Debian's
Alertmanager routing by the alertmanager.yml it wrote (group_wait 1 s) to the alarm receiver
(gauntlet/deploy/alarms.py, in a thread here). A warn-only rule only tells the webhook; the stable's server
killed, the error-rate rule fires and the receiver rolls @champion back to the previous version, recorded.
Skipped, saying why, where nginx, Prometheus or Alertmanager is not installed (.ci/run installs them).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.error
import uuid
from pathlib import Path

import pytest
import yaml

from gauntlet.deploy.router import nginx_binary
from tests.integration.test_deploy import PROMPTS, mlflow_client, models, register, run_flow, spec  # noqa: F401
from tests.integration.test_monitoring import _answers, free_port, start_prometheus, wait_for

PROMETHEUS, ALERTMANAGER = shutil.which("prometheus"), shutil.which("prometheus-alertmanager")
pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (apt-get install nginx)"),
              pytest.mark.skipif(PROMETHEUS is None or ALERTMANAGER is None,
                                 reason="prometheus or alertmanager is not installed (apt-get install prometheus "
                                        "prometheus-alertmanager; .ci/run installs them where it runs as root)")]
HOOK_ENV = "GAUNTLET_TEST_ALARM_HOOK"


@pytest.fixture()
def processes():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        p.terminate()
        p.wait(30)


def start_alertmanager(folder: Path, tmp_path: Path, started: list) -> int:
    config = yaml.safe_load((folder / "alertmanager.yml").read_text())
    config["route"]["group_wait"] = "1s"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(tmp_path / "alertmanager.log", "wb") as log:
        started.append(subprocess.Popen([ALERTMANAGER, f"--config.file={tmp_path / 'alertmanager.yml'}",
                                         f"--storage.path={tmp_path / 'am'}", f"--web.listen-address=127.0.0.1:{port}",
                                         "--cluster.listen-address="], stdout=log, stderr=log))
    wait_for("Alertmanager ready", lambda: _answers(port), 60)
    return port


def start_prometheus_alerting(folder: Path, tmp_path: Path, alertmanager_port: int, started: list) -> int:
    """Prometheus on the deploy's scrape fragment and the alert rules it wrote, sending to ``alertmanager_port``."""
    return start_prometheus(folder / "prometheus.yml", tmp_path, started, rule_files=[str(folder / "alerts.yml")],
                            alerting={"alertmanagers": [{"static_configs": [
                                {"targets": [f"127.0.0.1:{alertmanager_port}"]}]}]})


def keep_asking(router_port: int, name: str, until) -> threading.Event:
    """Requests through the router, one after another, until ``until()`` or the returned event is set."""
    from gauntlet.deploy.servers import chat

    stop = threading.Event()

    def loop() -> None:
        i = 0
        while not stop.is_set() and not until():
            with contextlib.suppress(OSError, urllib.error.HTTPError, ValueError):   # a killed stable: 502s
                chat(f"http://127.0.0.1:{router_port}", name, PROMPTS[i % len(PROMPTS)], 4)
            i += 1
    threading.Thread(target=loop, daemon=True).start()
    return stop


def test_a_failing_stable_is_rolled_back_by_its_alarm_and_a_warn_only_rule_only_tells(
        models, prefect_api, processes, webhook, monkeypatch, tmp_path) -> None:  # noqa: F811
    from gauntlet.audit import read
    from gauntlet.config.notify import NotifySpec, WebhookSpec
    from gauntlet.deploy.alarms import make_server
    from gauntlet.deploy.rollout import folder_of, load_state, stop_all
    from gauntlet.registry.store import history

    c = mlflow_client()
    name = f"deploy-alarm-{uuid.uuid4().hex[:6]}"
    hook_port, received = webhook
    monkeypatch.setenv(HOOK_ENV, f"http://127.0.0.1:{hook_port}/alarm")
    receiver = make_server("127.0.0.1", 0, NotifySpec(webhooks=[WebhookSpec(url_env=HOOK_ENV)]))
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    s = spec(thresholds={"max_p95_latency_s": 0.001})      # the p95 rule, no canary baseline: always above
    s = s.model_copy(update={"alerts": s.alerts.model_copy(update={
        "window_s": 5, "for_s": 1, "warn_only": ["p95_latency"],
        "receiver_url": f"http://127.0.0.1:{receiver.server_address[1]}"})})
    try:
        v1 = register(c, name, models["a"])
        v2 = register(c, name, models["b"])                  # @champion v2, v1 before it in the history
        assert "serves" in run_flow(name, s, tmp_path)       # v2 serves as stable
        folder, state = folder_of(name), load_state(name)
        start_prometheus_alerting(folder, tmp_path, start_alertmanager(folder, tmp_path, processes), processes)

        def told(alert: str) -> list[dict]:
            return [json.loads(body) for path, body in list(received) if alert in body.decode()]
        stop = keep_asking(state.router_port, name, lambda: told("GauntletP95Latency"))
        warned = wait_for("the warn-only p95 alarm told", lambda: told("GauntletP95Latency"), 90)
        stop.set()
        assert f"{name} v{v2}" in warned[0]["text"] and "warn only: nothing changed" in warned[0]["text"], warned
        assert str(c.get_model_version_by_alias(name, "champion").version) == v2
        assert history(c, name)[-1].action != "rollback"

        os.kill(state.stable.pid, signal.SIGKILL)            # the stable fails: every request a 502
        stop = keep_asking(state.router_port, name, lambda: told("GauntletErrorRate"))
        try:
            wait_for("@champion rolled back", lambda: str(c.get_model_version_by_alias(name, "champion").version)
                     == v1, 120)
        finally:
            stop.set()
        last = history(c, name)[-1]
        assert last.action == "rollback" and last.version == v1 and "GauntletErrorRate" in last.reason, last
        assert "alarm receiver (Alertmanager alert GauntletErrorRate)" in last.by, last
        audited = [e for e in read(model=name) if e["action"] == "rollback"]
        assert audited and "GauntletErrorRate" in audited[-1]["reason"], audited
        rolled = wait_for("the rollback told", lambda: told("GauntletErrorRate"), 30)
        assert f"@champion back to v{v1}" in rolled[0]["text"], rolled
    finally:
        receiver.shutdown()
        stop_all(name)
