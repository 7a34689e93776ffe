"""Stages ``gate`` and ``promote``: judge the report against the rules and the champion, then move
``@champion`` by compare-and-set. Never cached: both depend on the registry's state when they run.
"""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact

from gauntlet.config.gate import GateSpec, RegistrySpec
from gauntlet.gate import decide
from gauntlet.refs import EvalReport, GateDecision, PromotionResult, RegisteredVersion
from gauntlet.registry.promotion import promote_if_passing
from gauntlet.registry.reports import version_report
from gauntlet.registry.store import champion_of
from gauntlet.tasks._stage import StageRun, stage
from gauntlet.tasks.events import emit_champion_moved


def record_decision(stage: StageRun, model_name: str, decision: GateDecision, name: str = "gate_decision") -> str:
    """The decision in the stage's MLflow run (JSON, markdown, metrics, verdict tags); returns the markdown."""
    markdown = decision.markdown(model_name)
    stage.json(decision.as_json(model_name), f"{name}.json")
    stage.text(markdown, f"{name}.md")
    stage.metrics(decision.metrics())
    stage.tag("gate.verdict", "passed" if decision.passed else "failed")
    stage.tag("gate.compared_to", decision.compared_to)
    return markdown


@stage("gate", params=lambda spec, **_: {"gate.metric": spec.metric, "gate.max_regression": spec.max_regression,
                                         "gate.spec": spec.model_dump_json()})
def gate(spec: GateSpec, registry: RegistrySpec, report: EvalReport, base: EvalReport | None,
         stage: StageRun) -> GateDecision:
    version, scores = champion_of(stage.client, registry)
    decision = decide(spec, report, base, version, scores, version_report(stage.client, registry.model_name, version))
    markdown = record_decision(stage, registry.model_name, decision)
    create_markdown_artifact(markdown, key="gate-decision", description="quality gate decision")
    stage.log.info("gate PASSED" if decision.passed else "gate FAILED: " + "; ".join(decision.reasons))
    return decision


@stage("promote", params=lambda registry, candidate, **_: {"registry.model_name": registry.model_name,
                                                           "registry.version": candidate.version})
def promote(registry: RegistrySpec, gate_spec: GateSpec, decision: GateDecision, candidate: RegisteredVersion,
            report: EvalReport, base: EvalReport | None, stage: StageRun) -> PromotionResult:
    flow = stage.flow
    result = promote_if_passing(stage.client, registry, gate_spec, decision, candidate, report, base,
                                by=f"pipeline (Prefect flow run {flow.flow_run_id})",
                                run_ids={"mlflow_run_id": flow.parent_run_id, "prefect_flow_run_id": flow.flow_run_id})
    if result.decision is not None and result.decision != decision:  # re-gated under the lock
        markdown = record_decision(stage, registry.model_name, result.decision, "gate_decision_regated")
        create_markdown_artifact(markdown, key="gate-decision-regated",
                                 description="gate decision against the champion that replaced the one "
                                             "the first decision compared with")
    stage.tag("gauntlet.promotion", result.message)
    stage.log.info(result.message)
    if result.registered:   # @champion moved: the deploy deployment's trigger listens for this
        emit_champion_moved(registry.model_name, result.version, result.previous_champion, "promote", result.message)
    return result
