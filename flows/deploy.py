"""The deploy flow: serve a registered version; if another one serves, canary it step by step behind nginx,
watch each step and keep it or roll back.

Composition only. The ``deploy`` deployment (deployments/prefect.yaml) runs it when a promotion moves
``@champion`` (the ``gauntlet.champion.moved`` event); ``gauntlet deploy NAME[@alias]`` runs it by hand.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from gauntlet.deploy.drift import reference_prompts
from gauntlet.deploy.release import not_deployed_here, release_uri, settings
from gauntlet.deploy.watch import probe_rows
from gauntlet.tasks._flow import flow_parent_run
from gauntlet.tasks.deploy import canary_step, promote_canary, resolve_release, roll_back, start_release
from gauntlet.tracking import flatten_params, tracking_uri


@flow(name="deploy", log_prints=True)
def deploy(model: str, config: str | None = None, overrides: list[str] | None = None,
           experiment: str = "gauntlet-deploy") -> str:
    """Deploy a registered model version with a canary rollout.

    model: NAME (its @champion), NAME@alias, NAME/VERSION or models:/… .
    config: a run config whose deploy: section (backend, ports, steps, thresholds), notify: webhooks and data
        files (the probe's prompts, the drift reference) are used; the defaults when omitted. With a config
        only its registry.model_name is deployed: another model (a variant) completes with "nothing to deploy".
    overrides: --set style overrides of the config (deploy.steps=…).
    experiment: the MLflow experiment of the run.
    """
    got = settings(config, overrides)
    spec = got.deploy
    uri = release_uri(model)
    if (nothing := not_deployed_here(got, uri)) is not None:
        print(nothing)
        return nothing
    probe = probe_rows(Path(got.probe_file), spec.probe.limit) if got.probe_file and Path(got.probe_file).is_file() \
        else []
    reference = reference_prompts(Path(got.reference_file)) if got.reference_file and \
        Path(got.reference_file).is_file() else None
    tags = {"gauntlet.flow": "deploy", "deploy.model": uri}
    params = {"model": uri, "probe.rows": len(probe), "drift.reference": got.reference_file or "none",
              **flatten_params("deploy", spec.model_dump(mode="json"))}
    with flow_parent_run(tracking_uri(), experiment, f"deploy-{flow_run.name}", tags, params) as run:
        release = resolve_release(uri=uri, run=run)
        state = start_release(spec=spec, release=release, run=run)
        if state.canary is None:
            return f"{release.model} v{state.stable.version} serves on http://{state.host}:{state.router_port}"
        stable_version = state.stable.version
        for index in range(len(spec.steps)):
            outcome = canary_step(spec=spec, state=state, index=index, probe_rows=probe, reference=reference,
                                  stable_version=stable_version, run=run)
            if not outcome.verdict.healthy:
                return "rolled back: " + roll_back(state=state, outcome=outcome, notify=got.notify, run=run)
        state = promote_canary(state=state, run=run)
        return f"{release.model} v{state.stable.version} is stable on http://{state.host}:{state.router_port}"
