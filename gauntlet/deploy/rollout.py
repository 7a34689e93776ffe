"""What serves now, and the moves of a rollout: first deploy, canary start, weight shift, promotion, rollback.

One deployment per registered model, in ``$GAUNTLET_HOME/deploy/<model>/``: ``state.json`` (the servers, their
versions and ports, the weights, since when, and the rollout's events), ``nginx.conf`` and its logs, one
folder per server. ``gauntlet deploy status`` reads the state; a server or router that died is reported so.

The two slots use ``deploy.stable_port`` and ``deploy.canary_port``; a promoted canary keeps its port and
becomes stable, so the next canary takes the port the old stable freed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel

from gauntlet.audit import record
from gauntlet.config.deploy import DeploySpec
from gauntlet.deploy.router import Router, Weights
from gauntlet.deploy.servers import Server, now, pid_alive, start_server, stop_pid
from gauntlet.state import gauntlet_home

# rollout events that change what serves, and their audit actions
AUDITED = {"started": "deploy", "promoted": "deploy-promote", "stopped": "deploy-stop", "stopped all": "deploy-stop"}

if TYPE_CHECKING:
    from gauntlet.deploy.watch import StepReport


class DeployState(BaseModel):
    model: str
    router_port: int
    host: str = "127.0.0.1"
    stable: Server | None = None
    canary: Server | None = None
    weights: Weights = Weights()
    updated: str = ""
    events: list[dict] = []

    def event(self, what: str, **details) -> None:
        self.events.append({"at": now(), "event": what, **details})
        self.events = self.events[-200:]
        if what in AUDITED:   # what serves changed: into the audit log too
            version = details.get("version")
            record(AUDITED[what], f"{self.model} v{version}" if version else self.model,
                   f"deploy: {what}" + (f" ({details['slot']})" if "slot" in details else ""), model=self.model,
                   **details)


def folder_of(model: str) -> Path:
    return gauntlet_home() / "deploy" / model


def load_state(model: str) -> DeployState | None:
    path = folder_of(model) / "state.json"
    return DeployState.model_validate_json(path.read_text()) if path.is_file() else None


def save_state(state: DeployState) -> None:
    state.updated = now()
    folder = folder_of(state.model)
    folder.mkdir(parents=True, exist_ok=True)
    staged = folder / "state.json.next"
    staged.write_text(state.model_dump_json(indent=2))
    staged.replace(folder / "state.json")


def router_of(state: DeployState) -> Router:
    return Router(folder_of(state.model) / "router", state.host, state.router_port)


def apply_weights(state: DeployState, canary_percent: int) -> float:
    """Route ``canary_percent`` to the canary (0 when there is none); seconds the reload took."""
    state.weights = Weights(canary=canary_percent if state.canary else 0)
    seconds = router_of(state).apply(state.stable.port if state.stable else None,
                                     state.canary.port if state.canary and state.weights.canary else None,
                                     state.weights)
    state.event("weights", canary=state.weights.canary, reload_s=round(seconds, 3))
    save_state(state)
    return seconds


def current(spec: DeploySpec, model: str) -> DeployState:
    """The recorded deployment with its dead servers dropped, or a new empty one."""
    state = load_state(model) or DeployState(model=model, router_port=spec.router_port, host=spec.host)
    for slot in ("stable", "canary"):
        server = getattr(state, slot)
        if server is not None and not pid_alive(server.pid):
            state.event("server gone", slot=slot, version=server.version, pid=server.pid)
            setattr(state, slot, None)
    return state


def free_port(spec: DeploySpec, state: DeployState) -> int:
    taken = {s.port for s in (state.stable, state.canary) if s is not None}
    return next(p for p in (spec.stable_port, spec.canary_port) if p not in taken)


def start_release(spec: DeploySpec, model: str, version: str, model_dir: Path, log=print) -> DeployState:
    """Serve ``version``: as stable when nothing serves yet (weights all on it), else as the canary at weight
    0 (the flow then shifts traffic step by step). Already stable: nothing to do."""
    state = current(spec, model)
    if state.canary is not None:
        log(f"stopping the unfinished canary v{state.canary.version} first")
        stop_canary(state)
    if state.stable is not None and state.stable.version == str(version):
        log(f"{model} v{version} already serves as stable on port {state.stable.port}")
        apply_weights(state, 0)
        return state
    slot = "canary" if state.stable is not None else "stable"
    port = free_port(spec, state)
    log(f"starting {spec.backend} server for {model} v{version} ({slot}) on port {port}")
    server = start_server(spec.backend, slot, model, str(version), model_dir, spec.host, port,
                          folder_of(model) / f"server-{port}", spec.start_timeout_s)
    setattr(state, slot, server)
    state.event("started", slot=slot, version=str(version), port=port, pid=server.pid)
    apply_weights(state, 0)
    log(f"router on http://{spec.host}:{spec.router_port} → stable "
        f"v{state.stable.version}" + (f", canary v{server.version} at 0%" if slot == "canary" else ""))
    return state


def stop_canary(state: DeployState) -> float:
    """Weights back on stable first (seconds taken), then the canary's server stops."""
    canary = state.canary
    state.canary = None
    seconds = apply_weights(state, 0) if state.stable else 0.0
    if canary is not None:
        stop_pid(canary.pid)
        state.event("stopped", slot="canary", version=canary.version)
    save_state(state)
    return seconds


def promote_canary(state: DeployState) -> None:
    """The canary becomes stable (all traffic, already at 100%) and the old stable stops."""
    old, state.stable, state.canary = state.stable, state.canary.model_copy(update={"slot": "stable"}), None
    apply_weights(state, 0)
    if old is not None:
        stop_pid(old.pid)
    state.event("promoted", version=state.stable.version, replaced=old.version if old else None)
    save_state(state)


def stop_all(model: str) -> DeployState | None:
    state = load_state(model)
    if state is None:
        return None
    router_of(state).stop()
    for slot in ("canary", "stable"):
        server = getattr(state, slot)
        if server is not None:
            stop_pid(server.pid)
            setattr(state, slot, None)
    state.weights = Weights()
    state.event("stopped all")
    save_state(state)
    return state


def status_lines(state: DeployState) -> list[str]:
    """What ``gauntlet deploy status`` prints."""
    router = router_of(state)
    lines = [f"{state.model}: router http://{state.host}:{state.router_port} "
             f"({'running, pid ' + str(router.pid()) if router.running() else 'NOT running'}); updated {state.updated}"]
    for slot, share in (("stable", state.weights.stable), ("canary", state.weights.canary)):
        s = getattr(state, slot)
        if s is None:
            lines.append(f"  {slot}: none")
        else:
            alive = "serving" if pid_alive(s.pid) else "DEAD"
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
             reference: list[str] | None, log=print) -> "StepReport":
    """One canary step: shift the weight, watch the window (cut short if the canary's server dies), probe
    both servers, and measure. The caller judges (:func:`gauntlet.deploy.decide.judge`)."""
    from gauntlet.deploy.drift import drift, served_prompts
    from gauntlet.deploy.router import read_log
    from gauntlet.deploy.watch import StepReport, probe, prometheus_text, router_stats

    step = spec.steps[index]
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
    return report
