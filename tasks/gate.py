"""Stage 6, the quality gate, and the compare-and-set promotion it licenses.

``decide`` is a pure function: rules in, :class:`GateDecision` out (each rule with its measured value,
limit and verdict, and the champion version it compared against). ``promote_if_passing`` moves the
``champion`` alias under the registry lock (tasks/registry.py), and only if the champion is still the one
the decision compared against; otherwise it re-gates against the new champion first. Neither task is
cached: both depend on the registry's state at the moment they run.
"""

from __future__ import annotations

import logging

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tasks.evaluate import metric_key
from tasks.refs import EvalReport, GateDecision, GateRule, PromotionResult, RegisteredVersion, TaskScore
from tasks.registry import champion_of, clear_challenger, record_verdict, registry_lock, set_champion
from tasks.spec import GateSpec, RegistrySpec
from tasks.tracking import RunContext, stage_run

log = logging.getLogger(__name__)


EPS = 1e-9  # scores come back from tags with 6 decimals: 0.55 - 0.50 must not exceed 0.05


def gated_scores(report: EvalReport, metric: str) -> list[TaskScore]:
    """The scores the averaged and compared rules judge: one per evaluated task (a group's aggregate,
    e.g. MMLU's, not its 57 subtasks'), or every row of a report that lists no task results."""
    rows = [s for s in report.scores if s.metric == metric]
    if not report.task_results:
        return rows
    tasks = {r.task for r in report.task_results}
    return [s for s in rows if s.task in tasks]


def decide(spec: GateSpec, report: EvalReport, base: EvalReport | None,
           champion_version: str | None, champion_scores: dict[str, float]) -> GateDecision:
    """Apply every rule of ``spec``; the decision passes when all of them pass."""
    rules: list[GateRule] = []
    fmt = (lambda x: "—" if x is None else f"{x:.4f}")
    for task_name in spec.required_tasks:
        value = report.score(task_name, spec.metric)
        rules.append(GateRule(
            rule=f"required[{task_name}]", measured=value, limit=None, passed=value is not None,
            detail=f"required task {task_name!r} has no {spec.metric} score in the report" if value is None
            else f"{spec.metric}={value:.4f} present"))
    for task_name, limit in spec.min_scores.items():
        value = report.score(task_name, spec.metric)
        rules.append(GateRule(
            rule=f"min_score[{task_name}]", measured=value, limit=limit,
            passed=value is not None and value >= limit - EPS,
            detail=f"required task {task_name!r} has no {spec.metric} score in the report" if value is None
            else f"{spec.metric}={value:.4f} vs minimum {limit:.4f}"))
    if spec.min_average is not None:
        values = [s.value for s in gated_scores(report, spec.metric)]
        mean = sum(values) / len(values) if values else None
        rules.append(GateRule(
            rule="min_average", measured=mean, limit=spec.min_average,
            passed=mean is not None and mean >= spec.min_average - EPS,
            detail=f"no {spec.metric} scores in the report" if mean is None
            else f"mean {spec.metric} over {len(values)} task(s) {mean:.4f} vs minimum {spec.min_average:.4f}"))
    for field, limit in spec.ceilings.model_dump().items():
        if limit is None:
            continue
        value = getattr(report.perf, field) if report.perf else None
        rules.append(GateRule(
            rule=f"ceiling[{field}]", measured=value, limit=limit,
            passed=value is not None and value <= limit + EPS,
            detail="the report has no speed probe (eval.speed_probe.enabled)" if value is None
            else f"{value:.4g} vs ceiling {limit:.4g}"))
    if spec.min_gain_over_base is not None and base is not None:
        for s in gated_scores(report, spec.metric):
            before = base.score(s.task, s.metric)
            if before is None:
                continue
            gain = s.value - before
            rules.append(GateRule(rule=f"gain_over_base[{s.task}]", measured=gain, limit=spec.min_gain_over_base,
                                  passed=gain >= spec.min_gain_over_base - EPS,
                                  detail=f"{s.value:.4f} vs base {before:.4f} (gain {gain:+.4f})"))
    if champion_version is not None:
        for s in gated_scores(report, spec.metric):
            key = metric_key(s.task, s.metric)  # as the registry tags store it
            if key not in champion_scores:
                continue
            allowed = spec.max_regression_by_task.get(s.task, spec.max_regression)
            delta = s.value - champion_scores[key]
            rules.append(GateRule(rule=f"no_regression[{s.task}]", measured=delta, limit=-allowed,
                                  passed=delta >= -allowed - EPS,
                                  detail=f"{s.value:.4f} vs champion v{champion_version} {fmt(champion_scores[key])}"
                                         f" ({delta:+.4f}; allowed drop {allowed})"))
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


def decision_json(model_name: str, decision: GateDecision, version: str | None = None) -> dict:
    return {"model_name": model_name, "version": version, "verdict": "passed" if decision.passed else "failed",
            **decision.model_dump(mode="json"), "reasons": decision.reasons}


def _log_decision(c, run_id: str, model_name: str, decision: GateDecision, name: str = "gate_decision") -> str:
    markdown = decision_markdown(model_name, decision)
    c.log_dict(run_id, decision_json(model_name, decision), f"{name}.json")
    c.log_text(run_id, markdown, f"{name}.md")
    c.log_metric(run_id, "gate_passed", float(decision.passed))
    c.set_tag(run_id, "gate.verdict", "passed" if decision.passed else "failed")
    c.set_tag(run_id, "gate.compared_to", str(decision.compared_to))
    for r in decision.rules:
        if r.measured is not None:
            c.log_metric(run_id, "gate." + "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in r.rule),
                         float(r.measured))
    return markdown


def promote_if_passing(c, registry: RegistrySpec, gate: GateSpec, decision: GateDecision,
                       candidate: RegisteredVersion, report: EvalReport, base: EvalReport | None,
                       by: str, run_ids: dict[str, str | None] | None = None) -> PromotionResult:
    """Compare-and-set: under the registry lock, re-read the champion; if it is not the one ``decision``
    compared against, decide again against the one that is; move ``champion`` only on a pass."""
    name, version = registry.model_name, candidate.version
    result = dict(model_name=name, version=version)
    with registry_lock(c, name, registry.lock_timeout_s) as lease:
        current, scores = champion_of(c, registry)
        if current == version:   # a re-run of the champion's own recipe: keep the verdict it was promoted with
            return PromotionResult(registered=False, alias=registry.champion_alias, previous_champion=current,
                                   decision=decision, message=f"this model already is {name} v{version} "
                                                              f"@{registry.champion_alias}", **result)
        regated = current != decision.compared_to
        if regated:
            decision = decide(gate, report, base, current, scores)
        record_verdict(c, registry, version, decision)
        if not decision.passed:
            clear_challenger(c, registry, version)
            why = "; ".join(decision.reasons)
            message = (f"champion changed to v{current} meanwhile; re-gated and not promoted because {why}" if regated
                       else f"{name} v{version} not promoted because {why}")
            return PromotionResult(registered=False, previous_champion=current, decision=decision, message=message,
                                   **result)
        against = f"v{current}" if current else "no champion"
        set_champion(c, registry, version, current, "promote", by,
                     f"gate passed against {against}" + (" (re-gated: the champion changed meanwhile)" if regated
                                                         else ""),
                     lease, compared_to=current, **(run_ids or {}))
    return PromotionResult(registered=True, alias=registry.champion_alias, previous_champion=current,
                           decision=decision,
                           message=f"{name} v{version} is now @{registry.champion_alias} ("
                                   + (f"replaced v{current}" if current else "the first champion")
                                   + (", after re-gating against it" if regated else "") + ")", **result)


@task(name="gate", cache_policy=NO_CACHE)
def gate(spec: GateSpec, registry: RegistrySpec, report: EvalReport, base: EvalReport | None,
         run: RunContext) -> GateDecision:
    logger = get_run_logger()
    with stage_run(run, "gate", {"gate.metric": spec.metric, "gate.max_regression": spec.max_regression,
                                 "gate.spec": spec.model_dump_json()}) as (c, rid):
        version, scores = champion_of(c, registry)
        decision = decide(spec, report, base, version, scores)
        markdown = _log_decision(c, rid, registry.model_name, decision)
    create_markdown_artifact(markdown, key="gate-decision", description="quality gate decision")
    logger.info(("gate PASSED" if decision.passed else "gate FAILED: " + "; ".join(decision.reasons)))
    return decision


@task(name="promote", cache_policy=NO_CACHE)
def promote(registry: RegistrySpec, gate_spec: GateSpec, decision: GateDecision, candidate: RegisteredVersion,
            report: EvalReport, base: EvalReport | None, run: RunContext) -> PromotionResult:
    logger = get_run_logger()
    with stage_run(run, "promote", {"registry.model_name": registry.model_name,
                                    "registry.version": candidate.version}) as (c, rid):
        result = promote_if_passing(c, registry, gate_spec, decision, candidate, report, base,
                                    by=f"pipeline (Prefect flow run {run.flow_run_id})",
                                    run_ids={"mlflow_run_id": run.parent_run_id,
                                             "prefect_flow_run_id": run.flow_run_id})
        if result.decision is not None and result.decision != decision:  # re-gated under the lock
            markdown = _log_decision(c, rid, registry.model_name, result.decision, "gate_decision_regated")
            create_markdown_artifact(markdown, key="gate-decision-regated",
                                     description="gate decision against the champion that replaced the one "
                                                 "the first decision compared with")
        c.set_tag(rid, "gauntlet.promotion", result.message)
    logger.info(result.message)
    return result
