"""What serves now, and the moves of a rollout: first deploy, canary start, weight shift, promotion, rollback.

One deployment per registered model, served on one host (the serving host: the deploy flow runs on the
``serving`` work pool), in its ``$GAUNTLET_HOME/deploy/<model>/``: ``state.json`` (the servers, their versions
and ports, the weights, since when, and the rollout's events), ``nginx.conf`` and its logs, one folder per
server. With a shared MLflow the record is the registered model's tag ``gauntlet.deploy`` (without the events,
which the audit log has too): every host's ``gauntlet deploy status`` reads the same, and a serving host that
replaces another finds what was served there; the file is the serving host's copy. A server or router that
died is reported so.

Ports are chosen per model, under one lock for the host (``deploy/.ports.lock``): a server takes
``deploy.stable_port`` or ``deploy.canary_port``, the router ``deploy.router_port``, unless another
deployment's state holds that port (its router running, its server alive) or something else listens on it;
then the next port above that is free. So two models deployed with the same (or default) settings get
ports of their own. A promoted canary keeps its port and becomes stable, so the next canary takes the port
the old stable freed. The ports in use are in the state, and in ``gauntlet deploy status``.

A change of what serves (a server started, a canary promoted, servers stopped) is recorded in the audit
log by :func:`record_change`; the state's own ``events`` keep every step of the rollout.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, Field

from gauntlet.audit import record
from gauntlet.config.deploy import AlertSpec, DeploySpec
from gauntlet.deploy.router import Router, Weights
from gauntlet.deploy.servers import Server, ServerError, now, pid_alive, start_server, stop_pid
from gauntlet.files import write_text
from gauntlet.serve import port_free
from gauntlet.state import gauntlet_home, shared_tracking

PORT_SEARCH = 200          # how many ports above the configured ones are tried before giving up
STATE_TAG = "gauntlet.deploy"   # the registered model's tag holding its deployment record (a shared MLflow)
STATE_TAG_LIMIT = 5000     # MLflow's registered-model tag value column (varchar 5000)

if TYPE_CHECKING:
    from gauntlet.deploy.watch import StepReport


def this_node() -> str:
    """The host the servers of a deployment run on (its processes and ports are only checked there)."""
    return socket.gethostname()


class DeployState(BaseModel):
    model: str
    router_port: int
    host: str = "127.0.0.1"
    node: str = Field(default_factory=this_node)
    stable: Server | None = None
    canary: Server | None = None
    weights: Weights = Weights()
    updated: str = ""
    events: list[dict] = []
    alerts: AlertSpec = AlertSpec()          # the deploy's alert settings, for the rules rewritten at promotion
    max_p95_s: float = 10.0                  # thresholds.max_p95_latency_s: the p95 rule without a baseline
    baseline_p95_s: dict[str, float] = {}    # version → the p95 its last canary step measured

    def event(self, what: str, **details) -> None:
        self.events.append({"at": now(), "event": what, **details})
        self.events = self.events[-200:]


def record_change(state: DeployState, action: str, what: str, **details) -> None:
    """What serves changed: a rollout event in the state and an entry in the audit log (``action``:
    ``deploy``, ``deploy-promote``, ``deploy-stop``)."""
    state.event(what, **details)
    version = details.get("version")
    record(action, f"{state.model} v{version}" if version else state.model,
           f"deploy: {what}" + (f" ({details['slot']})" if "slot" in details else ""), model=state.model, **details)


def deploy_root() -> Path:
    return gauntlet_home() / "deploy"


def folder_of(model: str) -> Path:
    return deploy_root() / model


def _local_copy(model: str) -> DeployState | None:
    path = folder_of(model) / "state.json"
    return DeployState.model_validate_json(path.read_text()) if path.is_file() else None


def _registry():
    from gauntlet.tracking import client, tracking_uri

    uri = tracking_uri()
    return client(uri) if shared_tracking(uri) else None


def load_state(model: str) -> DeployState | None:
    """The deployment's record: with a shared MLflow its registered model's tag (the same on every host; this
    host's copy adds the events when it is the serving host), else this host's file."""
    registry = _registry()
    if registry is None:
        return _local_copy(model)
    from mlflow.exceptions import MlflowException

    try:
        raw = registry.get_registered_model(model).tags.get(STATE_TAG)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    if raw is None:
        return None
    state = DeployState.model_validate_json(raw)
    local = _local_copy(model)
    if local is not None and local.node == state.node:
        state.events = local.events
    return state


def save_state(state: DeployState) -> None:
    """This host's copy, then (a shared MLflow) the record every host reads, written whole as one tag."""
    state.updated = now()
    write_text(folder_of(state.model) / "state.json", state.model_dump_json(indent=2))
    if (registry := _registry()) is not None:
        record = state.model_dump_json(exclude={"events"})
        if len(record) > STATE_TAG_LIMIT:
            raise ServerError(f"{state.model}: the deployment record is {len(record)} characters, over MLflow's "
                              f"{STATE_TAG_LIMIT} for a registered model tag")
        registry.set_registered_model_tag(state.model, STATE_TAG, record)


def deployed_models() -> list[str]:
    """The models with a deployment record (on the shared MLflow, else in this host's state folder)."""
    registry = _registry()
    if registry is None:
        return sorted(p.parent.name for p in deploy_root().glob("*/state.json"))
    names, token = [], None
    while True:
        page = registry.search_registered_models(max_results=1000, page_token=token)
        names += [m.name for m in page if STATE_TAG in m.tags]
        if not (token := page.token):
            return sorted(names)


def router_of(state: DeployState) -> Router:
    return Router(folder_of(state.model) / "router", state.host, state.router_port)


def apply_weights(state: DeployState, canary_percent: int, drain: bool = False) -> float:
    """Route ``canary_percent`` to the canary (0 when there is none); seconds until the new weights serve.
    ``drain``: also wait until the old nginx workers are gone, before a server they route to stops."""
    state.weights = Weights(canary=canary_percent if state.canary else 0)
    seconds = router_of(state).apply(state.stable.port if state.stable else None,
                                     state.canary.port if state.canary and state.weights.canary else None,
                                     state.weights, drain=drain)
    state.event("weights", canary=state.weights.canary, reload_s=round(seconds, 3))
    save_state(state)
    return seconds


def current(spec: DeploySpec, model: str) -> DeployState:
    """The recorded deployment with its dead servers dropped, or a new empty one; a router that is not
    running gets its port anew (``deploy.router_port`` unless another deployment holds it)."""
    state = load_state(model) or DeployState(model=model, router_port=spec.router_port, host=spec.host)
    if state.node != this_node():   # served elsewhere until now: nothing of it runs here
        state.event("serving host changed", previous=state.node, now=this_node())
        state.node, state.stable, state.canary = this_node(), None, None
    for slot in ("stable", "canary"):
        server = getattr(state, slot)
        if server is not None and not pid_alive(server.pid):
            state.event("server gone", slot=slot, version=server.version, pid=server.pid)
            setattr(state, slot, None)
    if not router_of(state).running():
        state.router_port = free_port(state.host, [spec.router_port], ports_held_elsewhere(model) | server_ports(state))
    return state


def server_ports(state: DeployState) -> set[int]:
    return {s.port for s in (state.stable, state.canary) if s is not None}


def ports_held_elsewhere(model: str) -> set[int]:
    """The ports the other deployments on this host hold: their running routers' and their live servers'."""
    held: set[int] = set()
    for path in deploy_root().glob("*/state.json"):
        if path.parent.name == model:
            continue
        try:
            other = DeployState.model_validate_json(path.read_text())
        except (OSError, ValueError):
            continue
        if router_of(other).running():
            held.add(other.router_port)
        held |= {s.port for s in (other.stable, other.canary) if s is not None and pid_alive(s.pid)}
    return held


def free_port(host: str, preferred: list[int], taken: set[int]) -> int:
    """The first of ``preferred``, else of the ports above them, that is not ``taken`` and nothing listens on."""
    above = max(preferred) + 1
    for port in [*preferred, *range(above, min(above + PORT_SEARCH, 65536))]:
        if port not in taken and port_free(host, port):     # nothing listens on it
            return port
    raise ServerError(f"no free port among {preferred} and the {PORT_SEARCH} above them on {host}: `gauntlet "
                      "deploy status` shows which deployments hold ports, `gauntlet deploy stop NAME` frees them")


def start_release(spec: DeploySpec, model: str, version: str, model_dir: Path, log=print) -> DeployState:
    """Serve ``version``: as stable when nothing serves yet (weights all on it), else as the canary at weight
    0 (the flow then shifts traffic step by step). Already stable: nothing to do. Ports are chosen and taken
    under the host's port lock, so two deploys starting at once do not pick the same."""
    from filelock import FileLock

    deploy_root().mkdir(parents=True, exist_ok=True)
    with FileLock(str(deploy_root() / ".ports.lock")):
        state = _start_release(spec, model, version, model_dir, log)
        start_exporter(state, spec, log)
        return state


def start_exporter(state: DeployState, spec: DeploySpec, log=print) -> None:
    """The deployment's metrics exporter (:mod:`gauntlet.deploy.metrics`) unless it runs, on ``deploy.metrics_port``
    or the next free port, and its scrape config, ``prometheus.yml`` in the deployment's folder."""
    from gauntlet.deploy.metrics import ensure_exporter, running_exporter, write_scrape_config

    folder = folder_of(state.model)
    if (info := running_exporter(folder)) is None:
        port = free_port(state.host, [spec.metrics_port],
                         ports_held_elsewhere(state.model) | {state.router_port} | server_ports(state))
        info = ensure_exporter(state.model, folder, state.host, port)
    path = write_scrape_config(folder, state.model, state.node, info["host"], info["port"])
    state.alerts, state.max_p95_s = spec.alerts, spec.thresholds.max_p95_latency_s
    save_state(state)
    write_alert_files(state)
    log(f"metrics for Prometheus on http://{info['host']}:{info['port']}/metrics (scrape config: {path})")


def write_alert_files(state: DeployState) -> None:
    """``alerts.yml`` for the version stable serves (:mod:`gauntlet.deploy.alarms`) and ``alertmanager.yml``."""
    from gauntlet.deploy.alarms import write_alertmanager_config, write_rules
    if state.stable is not None:
        write_rules(folder_of(state.model), state.model, state.stable.version, state.alerts,
                    state.baseline_p95_s.get(state.stable.version), state.max_p95_s)
        write_alertmanager_config(folder_of(state.model), state.alerts)


def _start_release(spec: DeploySpec, model: str, version: str, model_dir: Path, log) -> DeployState:
    state = current(spec, model)
    if state.router_port != spec.router_port:
        log(f"port {spec.router_port} (deploy.router_port) is taken: {model}'s router listens on {state.router_port}")
    if state.canary is not None:
        log(f"stopping the unfinished canary v{state.canary.version} first")
        stop_canary(state)
    if state.stable is not None and state.stable.version == str(version):
        log(f"{model} v{version} already serves as stable on port {state.stable.port}")
        apply_weights(state, 0)
        return state
    slot: Literal["stable", "canary"] = "canary" if state.stable is not None else "stable"
    port = free_port(spec.host, [spec.stable_port, spec.canary_port],
                     ports_held_elsewhere(model) | {state.router_port} | server_ports(state))
    log(f"starting {spec.backend} server for {model} v{version} ({slot}) on port {port}")
    server = start_server(spec.backend, slot, model, str(version), model_dir, spec.host, port,
                          folder_of(model) / f"server-{port}", spec.start_timeout_s)
    setattr(state, slot, server)
    record_change(state, "deploy", "started", slot=slot, version=str(version), port=port, pid=server.pid)
    apply_weights(state, 0)
    assert state.stable is not None   # set above, or already serving
    log(f"router on http://{state.host}:{state.router_port} → stable "
        f"v{state.stable.version}" + (f", canary v{server.version} at 0%" if slot == "canary" else ""))
    return state


def stop_canary(state: DeployState) -> float:
    """Weights back on stable first (seconds until they serve), then, once the old nginx workers have
    finished the requests they still route to the canary, the canary's server stops."""
    canary = state.canary
    state.canary = None
    seconds = apply_weights(state, 0, drain=True) if state.stable else 0.0
    if canary is not None:
        stop_pid(canary.pid)
        record_change(state, "deploy-stop", "stopped", slot="canary", version=canary.version)
    save_state(state)
    return seconds


def promote_canary(state: DeployState) -> None:
    """The canary becomes stable (all traffic, already at 100%) and the old stable stops once the old nginx
    workers (which still have it as the backup) are gone."""
    if state.canary is None:
        raise RuntimeError(f"{state.model}: no canary to promote")
    old, state.stable, state.canary = state.stable, state.canary.model_copy(update={"slot": "stable"}), None
    apply_weights(state, 0, drain=True)
    if old is not None:
        stop_pid(old.pid)
    record_change(state, "deploy-promote", "promoted", version=state.stable.version,
                  replaced=old.version if old else None)
    save_state(state)
    write_alert_files(state)


def stop_all(model: str) -> DeployState | None:
    state = load_state(model)
    if state is None:
        return None
    if state.node != this_node():   # its pids are another host's
        raise ServerError(f"{model} is served on host {state.node}: run `gauntlet deploy stop {model}` there")
    router_of(state).stop()
    from gauntlet.deploy.metrics import stop_exporter

    stop_exporter(folder_of(model))
    for slot in ("canary", "stable"):
        server = getattr(state, slot)
        if server is not None:
            stop_pid(server.pid)
            setattr(state, slot, None)
    state.weights = Weights()
    record_change(state, "deploy-stop", "stopped all")
    save_state(state)
    return state


def status_lines(state: DeployState) -> list[str]:
    """What ``gauntlet deploy status`` prints."""
    here = state.node == this_node()   # processes are only checked on the serving host
    router = router_of(state)
    running = ('running, pid ' + str(router.pid()) if router.running() else 'NOT running') if here else \
        "not checked from this host"
    lines = [f"{state.model}: router http://{state.host}:{state.router_port} on host {state.node} ({running}); "
             f"updated {state.updated}"]
    for slot, share in (("stable", state.weights.stable), ("canary", state.weights.canary)):
        s = getattr(state, slot)
        if s is None:
            lines.append(f"  {slot}: none")
        else:
            alive = ("serving" if pid_alive(s.pid) else "DEAD") if here else f"on {state.node}"
            lines.append(f"  {slot}: v{s.version} on port {s.port} ({s.backend}, pid {s.pid}, {alive}) since {s.since}, "
                         f"{share if state.canary else 100}% of traffic")
    return lines


def wait(seconds: float, still_ok=lambda: True, every_s: float = 0.5) -> bool:
    """Sleep ``seconds`` in slices; False as soon as ``still_ok()`` is not."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not still_ok():
            return False
        time.sleep(min(every_s, max(0.0, deadline - time.monotonic())))
    return True


def state_json(state: DeployState) -> str:
    return json.dumps(json.loads(state.model_dump_json()), indent=2)


def run_step(state: DeployState, spec: DeploySpec, index: int, probe_rows: list[dict],
             reference: list[str] | None, log=print) -> StepReport:
    """One canary step: shift the weight, watch the window (cut short if the canary's server dies), probe
    both servers, and measure. The caller judges (:func:`gauntlet.deploy.decide.judge`)."""
    from gauntlet.deploy.drift import drift, served_prompts
    from gauntlet.deploy.router import read_log
    from gauntlet.deploy.watch import StepReport, probe, prometheus_text, router_stats

    step = spec.steps[index]
    if state.canary is None or state.stable is None:
        raise RuntimeError(f"{state.model}: a canary step needs a stable and a canary server")
    router = router_of(state)
    offset = router.access_log.stat().st_size if router.access_log.is_file() else 0
    apply_weights(state, step.weight)
    shifted_at = time.time()       # requests started before this were routed by the previous weights
    log(f"step {index + 1}/{len(spec.steps)}: canary v{state.canary.version} at {step.weight}%, "
        f"watching {step.watch_s:.0f} s")
    started = time.monotonic()
    canary_pid = state.canary.pid
    if not wait(step.watch_s, lambda: pid_alive(canary_pid)):
        log(f"the canary's server (pid {canary_pid}) is gone: the window ends now")
    ports = {"stable": state.stable.port, "canary": state.canary.port}
    results = {}
    for slot in ("stable", "canary"):
        server = getattr(state, slot)
        results[slot] = probe(server.url, state.model, probe_rows, spec.probe.max_tokens) if probe_rows and \
            pid_alive(server.pid) else (None, None, len(probe_rows))
    records, _ = read_log(router.access_log, offset)
    records = [r for r in records if float(r.get("t", 0)) - float(r.get("request_time", 0)) >= shifted_at]
    stats, share = router_stats(records, ports)
    for slot, (score, tps, failed) in results.items():
        stats[slot] = stats[slot].model_copy(update={"probe_score": score, "tokens_per_s": tps,
                                                     "probe_errors": failed})
    served = served_prompts(records)
    report = StepReport(step=index + 1, weight=step.weight, window_s=round(time.monotonic() - started, 2),
                        canary_share=round(share, 2), stable=stats["stable"], canary=stats["canary"],
                        drift=drift(reference, served) if reference and served else None)
    (folder_of(state.model) / "metrics.prom").write_text(prometheus_text(state.model, report))
    if p95 := report.canary.p95_s:   # the last step's, before a promotion: the alert rules' baseline
        state.baseline_p95_s = dict([*state.baseline_p95_s.items()][-4:] + [(state.canary.version, p95)])
        save_state(state)
    return report
