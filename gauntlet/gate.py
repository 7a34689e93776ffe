"""The quality gate: every rule of ``gate:`` applied to a report, each with its measured value and verdict.

Comparisons (against the champion, against the base model) are paired tests over the items both models
answered (:func:`gauntlet.eval.stats.paired_difference`) when both reports carry per-item records, and
are refused, naming the field, when the two were measured differently on that task. With
``gate.significance`` on, a comparison fails (or passes) only when its ``1 - alpha`` interval says so, so a
model does not lose its slot to one unlucky item. Reports without per-item records (a champion registered
before they existed) fall back to the point estimates, and the rule says so.

``decide`` is a pure function: rules in, :class:`GateDecision` out (each rule with its measured value,
limit and verdict, and the champion version it compared against). It knows nothing of the registry:
the gate stage reads the champion and hands its scores in, and the registry's compare-and-set promotion
(:mod:`gauntlet.registry.promotion`) calls it again if the champion moved meanwhile.
"""

from __future__ import annotations

from gauntlet.config.gate import GateSpec
from gauntlet.eval.judge import JUDGE_TASK, WIN_RATE
from gauntlet.eval.safety import BENIGN_TASK, HARMFUL_RATE, HARMFUL_TASK, OVER_REFUSAL_RATE
from gauntlet.eval.protocol import task_differences
from gauntlet.eval.stats import Comparison, paired_difference
from gauntlet.names import metric_key, mlflow_name
from gauntlet.refs import EvalReport, GateDecision, GateRule, TaskResult, TaskScore

EPS = 1e-9  # scores come back from tags with 6 decimals: 0.55 - 0.50 must not exceed 0.05


def gated_scores(report: EvalReport, metric: str) -> list[TaskScore]:
    """The scores the averaged and compared rules judge: one per evaluated task (a group's aggregate,
    e.g. MMLU's, not its 57 subtasks'), under ``metric`` as :func:`resolve_metric` finds it; or every
    row of a report that lists no task results."""
    if not report.task_results:
        return [s for s in report.scores if s.metric == metric]
    found = [resolve_metric(report, r.task, metric) for r in report.task_results]
    return [s for s in found if s is not None]


def resolve_metric(report: EvalReport, task: str, metric: str) -> TaskScore | None:
    """The task's score under ``metric``: that exact name, else (a name without a filter, such as
    ``exact_match``) the task's reported metric or its only filtered variant (``exact_match,last-number``)."""
    rows = [s for s in report.scores if s.task == task]
    exact = next((s for s in rows if s.metric == metric), None)
    if exact is not None or "," in metric:
        return exact
    filtered = [s for s in rows if s.metric.split(",")[0] == metric]
    reported = next((r.metric for r in report.task_results if r.task == task), None)
    return next((s for s in filtered if s.metric == reported), None) or (filtered[0] if len(filtered) == 1 else None)


def missing_metric(report: EvalReport, task: str, metric: str) -> str:
    """Why a task has no score under ``metric``, listing what the report has for it."""
    have = sorted({s.metric for s in report.scores if s.task == task})
    if not have:
        tasks = sorted({s.task for s in report.scores})
        return f"task {task!r} is not in the report (its tasks: {tasks}); add it to eval.tasks or fix the task name"
    return (f"task {task!r} has no {metric!r} score in the report; its metrics: {have}. Set gate.metric to one of "
            "them (a filtered metric is named 'metric,filter')")


def _task_result(report: EvalReport, task: str) -> TaskResult | None:
    return next((r for r in report.task_results if r.task == task), None)


def _items(report: EvalReport | None, score: TaskScore) -> dict[str, float] | None:
    """The per-item scores behind ``score`` (its task's, under its metric), None when the report has none."""
    result = _task_result(report, score.task) if report is not None else None
    items = result.item_scores.get(score.metric) if result is not None else None
    return items or None


def compare(spec: GateSpec, report: EvalReport, score: TaskScore, other: EvalReport | None, label: str,
            tested: float) -> tuple[Comparison | None, str | None]:
    """``score`` against the same task and metric in ``other``, paired over their common items: (comparison,
    None), or (None, why it cannot be compared item by item: no records, or measured differently)."""
    if other is None:
        return None, f"no report of the {label}"
    differences = task_differences(report, other, score.task)
    if differences:
        return None, (f"refused: the {label} was measured differently on {score.task!r} ("
                      + "; ".join(differences[:3]) + (f"; … {len(differences) - 3} more" if len(differences) > 3
                                                       else "") + ")")
    mine, theirs = _items(report, score), _items(other, score)
    if mine is None or theirs is None:
        return None, f"no per-item records of the {label}: point estimates compared"
    try:
        return paired_difference(mine, theirs, alpha=spec.alpha, tested=tested), None
    except ValueError as e:
        return None, f"refused: {e}"


def decide(spec: GateSpec, report: EvalReport, base: EvalReport | None,
           champion_version: str | None, champion_scores: dict[str, float],
           champion_report: EvalReport | None = None) -> GateDecision:
    """Apply every rule of ``spec``; the decision passes when all of them pass.

    ``champion_report``: the champion's registered evaluation (per-item records and protocol); without
    it the champion comparison uses ``champion_scores`` (the registry's score tags) as point estimates.
    """
    rules: list[GateRule] = []
    fmt = (lambda x: "—" if x is None else f"{x:.4f}")
    for task_name in spec.required_tasks:
        found = resolve_metric(report, task_name, spec.metric)
        rules.append(GateRule(
            rule=f"required[{task_name}]", measured=None if found is None else found.value, limit=None,
            passed=found is not None,
            detail=missing_metric(report, task_name, spec.metric) if found is None
            else f"{found.metric}={found.value:.4f} present"))
    for task_name, limit in spec.min_scores.items():
        found = resolve_metric(report, task_name, spec.metric)
        rules.append(GateRule(
            rule=f"min_score[{task_name}]", measured=None if found is None else found.value, limit=limit,
            passed=found is not None and found.value >= limit - EPS,
            detail=missing_metric(report, task_name, spec.metric) if found is None
            else f"{found.metric}={found.value:.4f}{_ci(found)} vs minimum {limit:.4f}"))
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
            need = spec.min_gain_over_base
            comparison, why = compare(spec, report, s, base, "base model", tested=need)
            if why is not None and why.startswith("refused"):
                rules.append(GateRule(rule=f"gain_over_base[{s.task}]", measured=None, limit=need, passed=False,
                                      detail=why))
                continue
            gain = s.value - before
            if comparison is not None and spec.significance.min_gain_over_base:
                passed = comparison.lo > need + EPS   # the whole interval clears the threshold
            else:
                passed = gain >= need - EPS
            detail = f"{s.value:.4f} vs base {before:.4f}: " + (comparison.text() if comparison is not None
                                                              else f"gain {gain:+.4f} ({why})")
            rules.append(GateRule(rule=f"gain_over_base[{s.task}]", measured=gain, limit=need, passed=passed,
                                  detail=detail + (f"; must clear {need:+.4f}" + (
                                      " with its whole interval" if spec.significance.min_gain_over_base else ""))))
    if spec.min_win_rate is not None:
        rules.append(_judged_limit(report, "min_win_rate", JUDGE_TASK, WIN_RATE, spec.min_win_rate,
                                   spec.significance.min_win_rate, "eval.judge"))
    for rule, task, metric in (("max_harmful_rate", HARMFUL_TASK, HARMFUL_RATE),
                               ("max_over_refusal_rate", BENIGN_TASK, OVER_REFUSAL_RATE)):
        if getattr(spec, rule) is not None:
            rules.append(_judged_limit(report, rule, task, metric, getattr(spec, rule),
                                       getattr(spec.significance, rule), "eval.safety", upper=True))
    if spec.max_perplexity_increase is not None:
        rules.append(_perplexity_rule(spec, report, base))
    if champion_version is not None:
        for s in gated_scores(report, spec.metric):
            key = metric_key(s.task, s.metric)  # as the registry tags store it
            if key not in champion_scores:
                continue
            allowed = spec.max_regression_by_task.get(s.task, spec.max_regression)
            comparison, why = compare(spec, report, s, champion_report, f"champion v{champion_version}",
                                      tested=-allowed)
            if why is not None and why.startswith("refused"):
                rules.append(GateRule(rule=f"no_regression[{s.task}]", measured=None, limit=-allowed, passed=False,
                                      detail=why + "; to judge this candidate, evaluate both under one protocol "
                                                   "(gauntlet eval) and promote by hand (gauntlet promote)"))
                continue
            delta = s.value - champion_scores[key] if comparison is None else comparison.delta
            if comparison is not None and spec.significance.no_regression:
                passed = comparison.hi >= -allowed - EPS   # fails only when the whole interval is below
            else:
                passed = delta >= -allowed - EPS
            detail = (f"{s.value:.4f} vs champion v{champion_version} {fmt(champion_scores[key])}: "
                      + (comparison.text() if comparison is not None else f"{delta:+.4f} ({why})")
                      + f"; allowed drop {allowed}"
                      + (", significance required" if comparison is not None and spec.significance.no_regression
                         else ""))
            rules.append(GateRule(rule=f"no_regression[{s.task}]", measured=delta, limit=-allowed,
                                  passed=passed, detail=detail))
    return GateDecision(passed=all(r.passed for r in rules), rules=rules, compared_to=champion_version,
                        champion_scores=champion_scores)


def _perplexity_rule(spec: GateSpec, report: EvalReport, base: EvalReport | None) -> GateRule:
    """The held-out byte perplexity may rise at most ``max_perplexity_increase`` (relative) over the base
    model's, compared by the paired bootstrap over the rows both scored; with the significance switch on,
    only a rise whose whole interval lies above the limit fails."""
    from gauntlet.eval.perplexity import perplexity_change

    rule, limit = "max_perplexity_increase", spec.max_perplexity_increase
    mine = report.perplexity
    theirs = base.perplexity if base is not None else None
    if mine is None or theirs is None:
        whose = "the report" if mine is None else "the base model's report" if base is not None else "no base report"
        return GateRule(rule=rule, measured=None, limit=limit, passed=False,
                        detail=f"{whose} has no held-out perplexity: configure eval.perplexity (and keep "
                               f"eval.compare_with_base on) to measure it")
    try:
        change = perplexity_change(mine, theirs, alpha=spec.alpha, tested=limit)
    except ValueError as e:
        return GateRule(rule=rule, measured=None, limit=limit, passed=False, detail=f"refused: {e}")
    significant = spec.significance.max_perplexity_increase
    passed = (change.lo <= limit + EPS) if significant else (change.delta <= limit + EPS)
    return GateRule(rule=rule, measured=change.delta, limit=limit, passed=passed,
                    detail=f"byte perplexity {mine.byte_perplexity:.4f} vs base {theirs.byte_perplexity:.4f}, "
                           f"relative change in %: {change.text()}; allowed rise {limit:.1%}"
                           + (", significance required" if significant else ""))


def _judged_limit(report: EvalReport, rule: str, task: str, metric: str, limit: float, significant: bool,
                  configure: str, upper: bool = False) -> GateRule:
    """A judged rate (with its interval) that must reach ``limit`` (``upper``: stay at or under it); with
    ``significant`` its whole interval must. A report without it fails, naming the config section that
    measures it."""
    found = resolve_metric(report, task, metric)
    if found is None:
        return GateRule(rule=rule, measured=None, limit=limit, passed=False,
                        detail=f"the report has no {task} {metric}: configure {configure} to measure it")
    if upper:
        worst = found.ci_high if significant and found.ci_high is not None else found.value
        passed, bound, end = worst <= limit + EPS, "maximum", "upper"
    else:
        worst = found.ci_low if significant and found.ci_low is not None else found.value
        passed, bound, end = worst >= limit - EPS, "minimum", "lower"
    return GateRule(rule=rule, measured=found.value, limit=limit, passed=passed,
                    detail=f"{metric} {found.value:.4f}{_ci(found)} vs {bound} {limit:.4f}"
                           + (f", the {end} end of its interval must meet it" if significant else ""))


def _ci(score: TaskScore) -> str:
    return "" if score.ci_low is None else f" (95% CI {score.ci_low:.4f}…{score.ci_high:.4f})"


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
