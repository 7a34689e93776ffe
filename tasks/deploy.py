"""Stages of the ``deploy`` flow: resolve the release, start it, watch each canary step, promote or roll back.

Never cached: each reads or changes what serves now. Each step's numbers go to its MLflow stage run (metrics,
``step-N.prom`` in Prometheus' text format, the verdict) and to the Prefect logs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from gauntlet.config.deploy import DeploySpec
from gauntlet.config.gate import RegistrySpec
from gauntlet.config.notify import NotifySpec
from gauntlet.deploy import rollout
from gauntlet.deploy.decide import Verdict, judge
from gauntlet.deploy.watch import StepReport, flat_metrics, prometheus_text
from gauntlet.tasks._stage import StageRun, stage


class Release(BaseModel):
    model: str
    version: str
    model_dir: str
    note: str                 # "models:/demo@champion → version 3 (run …)"


class StepOutcome(BaseModel):
    report: StepReport
    verdict: Verdict


@stage("resolve_release", run_name="resolve-release", params=lambda uri, **_: {"deploy.model": uri})
def resolve_release(uri: str, stage: StageRun) -> Release:
    """The registered version ``uri`` names, its files on local disk (through MLflow)."""
    from gauntlet.models import download_registry_model, registry_version

    _, mv = registry_version(uri, stage.flow.tracking_uri)
    path, note, _, _ = download_registry_model(f"models:/{mv.name}/{mv.version}", stage.flow.tracking_uri)
    stage.tag("deploy.version", mv.version)
    stage.log.info(f"release: {uri} → {mv.name} v{mv.version} ({path})")
    return Release(model=mv.name, version=str(mv.version), model_dir=str(path), note=note)


@stage("start_release", run_name="start", params=lambda spec, release, **_: {
    "deploy.backend": spec.backend, "deploy.version": release.version})
def start_release(spec: DeploySpec, release: Release, stage: StageRun) -> rollout.DeployState:
    state = rollout.start_release(spec, release.model, release.version, Path(release.model_dir), stage.log.info)
    stage.tag("deploy.stable", state.stable.version if state.stable else "none")
    stage.tag("deploy.canary", state.canary.version if state.canary else "none")
    return state


@stage("canary_step", run_name="step-{index}", params=lambda spec, index, **_: {
    "deploy.step": index + 1, "deploy.weight": spec.steps[index].weight, "deploy.watch_s": spec.steps[index].watch_s})
def canary_step(spec: DeploySpec, state: rollout.DeployState, index: int, probe_rows: list[dict],
                reference: list[str] | None, stable_version: str, stage: StageRun) -> StepOutcome:
    """Shift to this step's weight and watch; a window with too few canary requests is watched once more."""
    state = rollout.load_state(state.model)     # as recorded: what the previous stage left serving
    for attempt in (1, 2):
        report = rollout.run_step(state, spec, index, probe_rows, reference, stage.log.info)
        verdict = judge(report, spec.thresholds, stable_version)
        if verdict.judged or attempt == 2:
            break
        stage.log.info(f"{verdict.reasons[0]}: watching the step again")
    if not verdict.judged:
        verdict = verdict.model_copy(update={"reasons": verdict.reasons + ["no verdict after two windows"]})
    stage.metrics(flat_metrics(report))
    stage.text(prometheus_text(state.model, report), f"step-{index + 1}.prom")
    stage.json(report.model_dump(mode="json"), f"step-{index + 1}.json")
    stage.tag("deploy.verdict", "healthy" if verdict.healthy else "breach")
    c, s = report.canary, report.stable
    stage.log.info(f"step {index + 1}: canary {report.canary_share:.1f}% of traffic (weight {report.weight}%), "
                   f"errors {c.errors}/{c.requests} vs stable {s.errors}/{s.requests}, p95 {c.p95_s} s vs {s.p95_s} s, "
                   f"probe {c.probe_score} vs {s.probe_score}, tokens/s {c.tokens_per_s} vs {s.tokens_per_s}"
                   + (f", drift PSI {report.drift.psi}" if report.drift else "")
                   + (" → healthy" if verdict.healthy else " → BREACH: " + "; ".join(verdict.reasons)))
    return StepOutcome(report=report, verdict=verdict)


@stage("promote_canary", run_name="promote-canary")
def promote_canary(state: rollout.DeployState, stage: StageRun) -> rollout.DeployState:
    state = rollout.load_state(state.model)
    old = state.stable.version if state.stable else None
    rollout.promote_canary(state)
    stage.log.info(f"{state.model} v{state.stable.version} is stable (100% of traffic); v{old} stopped")
    return state


@stage("roll_back", run_name="roll-back")
def roll_back(state: rollout.DeployState, outcome: StepOutcome, notify: NotifySpec, stage: StageRun) -> str:
    """Traffic back on stable first (seconds), then the canary stops, then @champion goes back to the version
    stable serves through the registry's recorded rollback; a notification says why."""
    from gauntlet.notify import Notice, send
    from gauntlet.registry.lock import RegistryError
    from gauntlet.registry.promotion import rollback
    from gauntlet.registry.store import champion_of
    from gauntlet.tasks.notify import read_secret

    state = rollout.load_state(state.model)
    canary, stable = state.canary.version, state.stable.version
    seconds = rollout.stop_canary(state)
    reason = f"canary v{canary} breached at step {outcome.report.step} ({outcome.report.weight}%): " \
             + "; ".join(outcome.verdict.reasons)
    stage.metric("rollback.reload_s", seconds)
    stage.log.warning(f"weights back on stable v{stable} in {seconds:.2f} s; {reason}")
    registry = RegistrySpec(model_name=state.model)
    champion, _ = champion_of(stage.client, registry)
    if champion == canary:
        try:
            event = rollback(stage.client, registry, reason=reason[:4000], by=f"deploy flow ({stage.flow.flow_run_id})")
            message = f"@champion back to v{event.version} (recorded: {reason})"
        except RegistryError as e:
            message = f"@champion left at v{champion}: {e}"
    else:
        message = f"@champion is v{champion}, not the canary: left alone"
    stage.log.warning(message)
    stage.tag("deploy.rollback", message[:4000])
    notice = Notice(event="rolled_back", model_name=state.model, version=canary,
                    verdict=f"rolled back in serving: v{canary} → v{stable}; {message}",
                    reasons=outcome.verdict.reasons, mlflow_run_id=stage.flow.parent_run_id,
                    flow_run_id=str(stage.flow.flow_run_id))
    if notify.webhooks:
        send(notify, notice, stage.log, read_secret)
    return message
