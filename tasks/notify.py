"""Stage ``notify`` and the finetune flow's failure hook: webhook messages on promotion, failed gate and
failed run (gauntlet.notify renders and sends them). Secret blocks and the Prefect UI's links are read
here, where Prefect is.
"""

from __future__ import annotations

from gauntlet.config.gate import RegistrySpec
from gauntlet.config.notify import NotifySpec
from gauntlet.notify import failed_run_notice, outcome_notice, send
from gauntlet.refs import EvalReport, PromotionResult
from gauntlet.tasks._stage import StageRun, stage


def read_secret(block: str) -> str:
    """A Prefect Secret block's value (a webhook URL): never logged."""
    from prefect.blocks.system import Secret

    return str(Secret.load(block).get())


def prefect_ui_url() -> str | None:
    """The Prefect UI's base URL, when there is one (an ephemeral API has none)."""
    from prefect.settings import PREFECT_UI_URL

    return PREFECT_UI_URL.value() or None


@stage("notify", mlflow=False)
def notify_outcome(spec: NotifySpec, registry: RegistrySpec, promotion: PromotionResult, report: EvalReport,
                   base: EvalReport | None, stage: StageRun) -> int:
    notice = outcome_notice(spec, registry, promotion, report, base, stage.flow, prefect_ui_url())
    if notice is None or not spec.webhooks:
        return 0
    return send(spec, notice, stage.log, read_secret)


def notify_failed_run(flow, flow_run, state) -> None:
    """Prefect ``on_failure``/``on_crashed`` hook of the finetune flows: the run's config for its ``notify``
    section, from the flow run's parameters (the spec ``finetune_spec`` was given, as Prefect recorded it, or the
    config ``finetune`` read; a config that does not validate has none to use)."""
    from pydantic import ValidationError

    from gauntlet.config.load import load_spec
    from gauntlet.config.problems import SpecError
    from gauntlet.config.run import RunSpec
    from gauntlet.project import ProjectError, in_project
    from gauntlet.tracking import tracking_uri

    params = flow_run.parameters or {}
    try:
        spec = (RunSpec.model_validate(params["spec"]) if "spec" in params
                else load_spec(in_project(params.get("config", "configs/demo.yaml")), params.get("overrides") or []))
    except (SpecError, ValidationError, OSError, ProjectError):
        return
    if not spec.notify.webhooks:
        return
    notice = failed_run_notice(spec.notify, spec.registry.model_name, state.message or state.name,
                               str(flow_run.id), tracking_uri(spec.tracking.tracking_uri), spec.tracking.experiment,
                               prefect_ui_url())
    send(spec.notify, notice, read_secret=read_secret)
