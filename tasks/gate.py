"""Stage 6, the quality gate and promotion in the MLflow Model Registry.

``decide`` is a pure function: rules in, :class:`GateDecision` out (each rule with its measured value,
limit and verdict). ``promote`` registers a passing model from its durable folder with lineage tags and
moves the ``champion`` alias, only if the champion is still the one the decision compared against.
Neither is cached: both depend on the registry's state at the moment they run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.refs import DatasetRef, EvalReport, GateDecision, GateRule, PromotionResult, TrainedModel
from tasks.spec import GateSpec, RegistrySpec
from tasks.tracking import RunContext, git_commit, stage_run

log = logging.getLogger(__name__)
SCORE_TAG = "score."


def champion_of(c, registry: RegistrySpec) -> tuple[str | None, dict[str, float]]:
    """The current champion's version and its recorded scores, or (None, {})."""
    from mlflow.exceptions import MlflowException

    try:
        mv = c.get_model_version_by_alias(registry.model_name, registry.champion_alias)
    except MlflowException:
        return None, {}
    scores = {k[len(SCORE_TAG):]: float(v) for k, v in mv.tags.items() if k.startswith(SCORE_TAG)}
    return str(mv.version), scores


def decide(spec: GateSpec, report: EvalReport, base: EvalReport | None,
           champion_version: str | None, champion_scores: dict[str, float]) -> GateDecision:
    rules: list[GateRule] = []
    for task_name, limit in spec.min_scores.items():
        value = report.score(task_name, spec.metric)
        rules.append(GateRule(
            rule=f"min_score[{task_name}]", measured=value, limit=limit,
            passed=value is not None and value >= limit,
            detail="required task has no score in the report" if value is None
            else f"{spec.metric}={value:.4f} vs minimum {limit:.4f}"))
    if spec.min_gain_over_base is not None and base is not None:
        for s in report.scores:
            if s.metric != spec.metric:
                continue
            before = base.score(s.task, s.metric)
            gain = s.value - (before or 0.0)
            rules.append(GateRule(rule=f"gain_over_base[{s.task}]", measured=gain, limit=spec.min_gain_over_base,
                                  passed=gain >= spec.min_gain_over_base,
                                  detail=f"{s.value:.4f} vs base {before:.4f} (gain {gain:+.4f})"))
    if champion_version is not None:
        for s in report.scores:
            key = f"{s.task}.{s.metric}"
            if s.metric != spec.metric or key not in champion_scores:
                continue
            drop = champion_scores[key] - s.value
            rules.append(GateRule(rule=f"no_regression[{s.task}]", measured=-drop, limit=-spec.max_regression,
                                  passed=drop <= spec.max_regression,
                                  detail=f"{s.value:.4f} vs champion v{champion_version} {champion_scores[key]:.4f}"
                                         f" (allowed drop {spec.max_regression})"))
    return GateDecision(passed=all(r.passed for r in rules), rules=rules, compared_to=champion_version,
                        champion_scores=champion_scores)


def decision_markdown(model_name: str, decision: GateDecision) -> str:
    verdict = "PASSED" if decision.passed else "FAILED"
    against = f"champion v{decision.compared_to}" if decision.compared_to else "no champion yet"
    lines = [f"# Gate {verdict}: {model_name}", "", f"Compared against: {against}", "",
             "| rule | measured | limit | verdict | detail |", "|---|---|---|---|---|"]
    for r in decision.rules:
        fmt = (lambda x: "—" if x is None else f"{x:.4f}")
        lines.append(f"| {r.rule} | {fmt(r.measured)} | {fmt(r.limit)} | {'pass' if r.passed else '**FAIL**'} "
                     f"| {r.detail} |")
    return "\n".join(lines)


def register_version(c, registry: RegistrySpec, run_id: str, model_dir: Path, tags: dict[str, str]) -> str:
    """Register the durable model folder (logged as the run's ``model`` artifact) as a new version."""
    from mlflow.exceptions import MlflowException

    c.log_artifacts(run_id, str(model_dir), "model")
    try:
        c.create_registered_model(registry.model_name)
    except MlflowException:
        pass  # already exists
    source = f"{c.get_run(run_id).info.artifact_uri}/model"
    mv = c.create_model_version(registry.model_name, source=source, run_id=run_id, tags=tags)
    return str(mv.version)


def version_with_sha(c, registry: RegistrySpec, sha: str) -> str | None:
    """The registered version holding exactly these model files, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = c.search_model_versions(f"name='{registry.model_name}'")
    except MlflowException:
        return None
    matches = [str(v.version) for v in versions if v.tags.get("model.sha") == sha]
    return min(matches, key=int) if matches else None


def promote_if_passing(c, registry: RegistrySpec, gate: GateSpec, decision: GateDecision, report: EvalReport,
                       base: EvalReport | None, run_id: str, model_dir: Path, lineage: dict[str, str]) -> PromotionResult:
    if not decision.passed:
        return PromotionResult(registered=False, model_name=registry.model_name,
                               message="not promoted because " + "; ".join(decision.reasons))
    # Compare-and-set: the alias moves only if the champion is still the one we beat.
    current, scores = champion_of(c, registry)
    if current != decision.compared_to:
        decision = decide(gate, report, base, current, scores)
        if not decision.passed:
            return PromotionResult(registered=False, model_name=registry.model_name,
                                   message=f"champion changed to v{current} meanwhile; re-gated and not promoted "
                                           "because " + "; ".join(decision.reasons))
    existing = version_with_sha(c, registry, lineage["model.sha"])
    if existing is not None and existing == current:
        return PromotionResult(registered=False, model_name=registry.model_name, version=existing,
                               alias=registry.champion_alias,
                               message=f"this model is already {registry.model_name} v{existing} @{registry.champion_alias}")
    tags = {**lineage, "gate.verdict": "passed", "gate.compared_to": str(decision.compared_to)}
    tags.update({f"{SCORE_TAG}{s.task}.{s.metric}": f"{s.value:.6f}" for s in report.scores})
    # A re-run after a crash finds the version it registered before instead of adding a duplicate.
    version = existing or register_version(c, registry, run_id, model_dir, tags)
    c.set_registered_model_alias(registry.model_name, registry.champion_alias, version)
    c.set_model_version_tag(registry.model_name, version, "promoted.previous_champion", str(current))
    return PromotionResult(registered=True, model_name=registry.model_name, version=version,
                           alias=registry.champion_alias,
                           message=f"registered {registry.model_name} v{version} and set @{registry.champion_alias}")


@task(name="gate", cache_policy=NO_CACHE)
def gate(spec: GateSpec, registry: RegistrySpec, report: EvalReport, base: EvalReport | None,
         run: RunContext) -> GateDecision:
    logger = get_run_logger()
    with stage_run(run, "gate", {"gate.metric": spec.metric, "gate.max_regression": spec.max_regression}) as (c, rid):
        version, scores = champion_of(c, registry)
        decision = decide(spec, report, base, version, scores)
        c.log_dict(rid, decision.model_dump(mode="json"), "gate_decision.json")
        c.log_metric(rid, "gate_passed", float(decision.passed))
        markdown = decision_markdown(registry.model_name, decision)
        c.log_text(rid, markdown, "gate_decision.md")
    create_markdown_artifact(markdown, key="gate-decision", description="quality gate decision")
    logger.info(("gate PASSED" if decision.passed else "gate FAILED: " + "; ".join(decision.reasons)))
    return decision


@task(name="promote", cache_policy=NO_CACHE)
def promote(registry: RegistrySpec, gate_spec: GateSpec, decision: GateDecision, trained: TrainedModel,
            report: EvalReport, base: EvalReport | None, data: DatasetRef, config_hash: str,
            run: RunContext) -> PromotionResult:
    logger = get_run_logger()
    lineage = {"base_model.source": trained.base.source, "base_model.sha": trained.base.sha,
               "base_model.revision": str(trained.base.revision), "data.md5": data.md5, "config_hash": config_hash,
               "git_commit": git_commit(), "model.sha": trained.merged.sha, "model.path": trained.output_dir,
               "prefect.flow_run_id": str(run.flow_run_id), "mlflow.parent_run_id": run.parent_run_id}
    with stage_run(run, "promote", {"registry.model_name": registry.model_name}) as (c, rid):
        result = promote_if_passing(c, registry, gate_spec, decision, report, base, rid,
                                    Path(trained.merged.path), lineage)
        c.set_tag(rid, "gauntlet.promotion", result.message)
    logger.info(result.message)
    return result
