"""The serving metrics Prometheus scrapes: a small exporter beside each deployment's router.

It tails the router's JSON access log (:data:`gauntlet.deploy.router.LOG_FORMAT`) and reads the deployment's
``state.json`` for which server listens on which port, so every request is counted against the slot
(``stable`` or ``canary``) and the registered version that answered it:

- ``gauntlet_router_requests_total{model,slot,version,code}``: attempts on a server (a request nginx retried
  on the other upstream counts once on each, as in :func:`gauntlet.deploy.watch.router_stats`); ``code`` is
  the upstream's status, ``-`` for a refused or timed-out attempt;
- ``gauntlet_router_errors_total{model,slot,version}``: the failed ones (5xx, refused, timed out);
- ``gauntlet_router_request_duration_seconds{model,slot,version}``: a histogram of ``$request_time`` of the
  requests each server answered;
- ``gauntlet_server_resident_memory_bytes{model,slot,version}``: the resident memory of a server's process
  and its children, read from ``/proc`` at scrape time;
- ``gauntlet_deploy_canary_weight_percent{model}``: the configured canary weight.

It is a process of its own, not a thread of the deploy: ``gauntlet deploy`` (and the deploy flow) returns while
the router and the servers keep serving, so the exporter has to outlive it the same way. :func:`ensure_exporter`
starts it in its own session (its pid and port in ``metrics/exporter.json``), the rollout calls it whenever it
starts a release, and ``gauntlet deploy stop`` stops it (:func:`stop_exporter`); left without a router for
:data:`ORPHAN_S` it exits by itself. :func:`write_scrape_config` writes the ``prometheus.yml`` fragment
(``scrape_configs``) naming its target. The access log has neither token counts nor a first-token time, so
tokens/s and time to first token are not exported (the canary steps' probe measures tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from gauntlet.deploy.router import read_log
from gauntlet.deploy.servers import pid_alive, stop_pid
from gauntlet.deploy.watch import attempts

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
POLL_S = 0.5        # how often the access log and the state are read
ORPHAN_S = 30.0     # the exporter exits once its router has not run for this long
SCRAPE_INTERVAL = "15s"


class Slots:
    """port → (slot, version), and the servers' pids, from the deployment's ``state.json``."""

    def __init__(self, folder: Path):
        self.path = folder / "state.json"
        self.ports: dict[str, tuple[str, str]] = {}          # "8781" → ("stable", "3")
        self.pids: dict[tuple[str, str], int] = {}           # ("stable", "3") → its server's pid
        self.weight = 0
        self.router_pid_file = folder / "router" / "nginx.pid"

    def refresh(self) -> None:
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        ports: dict[str, tuple[str, str]] = {}
        pids: dict[tuple[str, str], int] = {}
        for slot in ("stable", "canary"):
            server = state.get(slot)
            if server:
                ports[str(server["port"])] = (slot, str(server["version"]))
                pids[(slot, str(server["version"]))] = int(server["pid"])
        self.ports, self.pids = ports, pids
        self.weight = int((state.get("weights") or {}).get("canary", 0))

    def router_running(self) -> bool:
        try:
            return pid_alive(int(self.router_pid_file.read_text().strip()))
        except (OSError, ValueError):
            return False


def resident_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (``/proc/PID/statm``), 0 when it is gone."""
    page, total, todo, seen = os.sysconf("SC_PAGE_SIZE"), 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


class Exporter:
    """The metrics of one deployment, fed from its access log."""

    def __init__(self, model: str, folder: Path):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.model, self.slots = model, Slots(folder)
        self.log_path = folder / "router" / "access.log"
        self.registry = CollectorRegistry()
        labels = ["model", "slot", "version"]
        self.requests = Counter("gauntlet_router_requests", "attempts on a model server through the router",
                                [*labels, "code"], registry=self.registry)
        self.errors = Counter("gauntlet_router_errors", "failed attempts: 5xx, refused or timed out", labels,
                              registry=self.registry)
        self.latency = Histogram("gauntlet_router_request_duration_seconds",
                                 "request time at the router of the requests a server answered, seconds", labels,
                                 buckets=BUCKETS, registry=self.registry)
        self.registry.register(_Gauges(self))
        self.offset = self.log_path.stat().st_size if self.log_path.is_file() else 0

    def poll(self) -> None:
        """Read the state and the access log's new lines into the metrics."""
        self.slots.refresh()
        for slot, version in self.slots.pids:       # series at 0 before the first request, so rate() sees it
            self.latency.labels(self.model, slot, version)
            self.errors.labels(self.model, slot, version)
        records, self.offset = read_log(self.log_path, self.offset)
        for record in records:
            self.count(record)

    def count(self, record: dict) -> None:
        tries = attempts(record)
        for i, (addr, status) in enumerate(tries):
            slot, version = self.slots.ports.get(addr.rsplit(":", 1)[-1], ("unknown", "unknown"))
            self.requests.labels(self.model, slot, version, status if status.isdigit() else "-").inc()
            if not status.isdigit() or int(status) >= 500:
                self.errors.labels(self.model, slot, version).inc()
            elif i == len(tries) - 1:
                self.latency.labels(self.model, slot, version).observe(float(record.get("request_time", 0)))


class _Gauges:
    """What is read at scrape time: the servers' resident memory, the canary's weight."""

    def __init__(self, exporter: Exporter):
        self.exporter = exporter

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        memory = GaugeMetricFamily("gauntlet_server_resident_memory_bytes",
                                   "resident memory of a model server's processes, bytes",
                                   labels=["model", "slot", "version"])
        for (slot, version), pid in self.exporter.slots.pids.items():
            memory.add_metric([self.exporter.model, slot, version], resident_bytes(pid))
        weight = GaugeMetricFamily("gauntlet_deploy_canary_weight_percent", "the canary's configured weight",
                                   labels=["model"])
        weight.add_metric([self.exporter.model], self.exporter.slots.weight)
        return [memory, weight]


def serve(model: str, folder: Path, host: str, port: int) -> None:
    """Export on ``host:port`` until the router has been gone for ``ORPHAN_S`` (or a signal ends it)."""
    from prometheus_client import start_http_server

    exporter = Exporter(model, folder)
    start_http_server(port, addr=host, registry=exporter.registry)
    last_seen = time.monotonic()
    while True:
        exporter.poll()
        if exporter.slots.router_running():
            last_seen = time.monotonic()
        elif time.monotonic() - last_seen > ORPHAN_S:
            return
        time.sleep(POLL_S)


def exporter_file(folder: Path) -> Path:
    return folder / "metrics" / "exporter.json"


def running_exporter(folder: Path) -> dict | None:
    """The exporter's ``{pid, port, host}`` when it runs."""
    try:
        info = json.loads(exporter_file(folder).read_text())
    except (OSError, ValueError):
        return None
    return info if pid_alive(info.get("pid")) else None


def ensure_exporter(model: str, folder: Path, host: str, port: int, timeout_s: float = 20.0) -> dict:
    """The deployment's exporter, started on ``port`` unless one runs already; waits until it answers."""
    if (info := running_exporter(folder)) is not None:
        return info
    (folder / "metrics").mkdir(parents=True, exist_ok=True)
    with open(folder / "metrics" / "exporter.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gauntlet.deploy.metrics", model, str(folder.resolve()),
                                 "--host", host, "--port", str(port)], stdout=out, stderr=out,
                                start_new_session=True)
    info = {"pid": proc.pid, "host": host, "port": port}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection((host, port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        stop_pid(proc.pid)
        raise RuntimeError(f"the metrics exporter of {model} did not listen on {host}:{port} "
                           f"(see {folder / 'metrics' / 'exporter.log'})")
    exporter_file(folder).write_text(json.dumps(info))
    return info


def stop_exporter(folder: Path) -> None:
    if (info := running_exporter(folder)) is not None:
        stop_pid(info["pid"], grace_s=5)


def scrape_config(model: str, node: str, host: str, port: int) -> dict:
    """A ``prometheus.yml`` fragment: the exporter's target and its labels."""
    return {"scrape_configs": [{"job_name": f"gauntlet-deploy-{model}", "scrape_interval": SCRAPE_INTERVAL,
                                "static_configs": [{"targets": [f"{host}:{port}"],
                                                    "labels": {"deployment": model, "node": node}}]}]}


def write_scrape_config(folder: Path, model: str, node: str, host: str, port: int) -> Path:
    import yaml

    from gauntlet.files import write_text

    path = folder / "prometheus.yml"
    write_text(path, "# Written by gauntlet deploy (gauntlet/deploy/metrics.py): add these scrape_configs to "
                     "prometheus.yml.\n" + yaml.safe_dump(scrape_config(model, node, host, port), sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gauntlet.deploy.metrics", description=__doc__)
    parser.add_argument("model")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    serve(args.model, args.folder, args.host, args.port)


if __name__ == "__main__":
    main()
