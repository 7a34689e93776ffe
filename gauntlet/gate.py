"""The quality gate: every rule of ``gate:`` applied to a report, each with its measured value and verdict.

``decide`` is a pure function: rules in, :class:`GateDecision` out (each rule with its measured value,
limit and verdict, and the champion version it compared against). It knows nothing of the registry:
the gate stage reads the champion and hands its scores in, and the registry's compare-and-set promotion
(:mod:`gauntlet.registry.promotion`) calls it again if the champion moved meanwhile.
"""

from __future__ import annotations

from gauntlet.config.gate import GateSpec
from gauntlet.names import metric_key, mlflow_name
from gauntlet.refs import EvalReport, GateDecision, GateRule, TaskScore

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


def decision_metrics(decision: GateDecision) -> dict[str, float]:
    """The decision as MLflow metrics: ``gate_passed`` and each rule's measured value."""
    out = {"gate_passed": float(decision.passed)}
    out.update({mlflow_name("gate", r.rule): float(r.measured) for r in decision.rules if r.measured is not None})
    return out
