"""The quality gate: every rule of ``gate:`` applied to a report, each with its measured value and verdict.

Rules are small registered functions, in lm-evaluation-harness's registry style
(``@register_rule("min_score")``, as lm-eval's ``@register_metric``): each reads the :class:`GateInputs`
and returns its :class:`~gauntlet.refs.GateRule` verdicts (none when its setting is off), typed as passed,
failed or refused, with the numbers it judged. :func:`decide` applies them in the order they are registered
here; :func:`get_rule` finds one by name, with a close match for a misspelt one.

Every score is read through :mod:`gauntlet.eval.scores` (a name resolves as the leaderboard resolves it;
one fitting several filters is refused, naming them). Comparisons with the champion and the base model are
paired tests over the items both answered (:func:`gauntlet.eval.stats.paired_difference`), refused, naming
the field, when the two were measured differently on that task. With ``gate.significance`` on, a comparison
fails (or passes) only when its ``1 - alpha`` interval says so, so a model does not lose its slot to one
unlucky item. Reports without per-item records fall back to the point estimates, and the rule says so.

``decide`` is a pure function: rules in, :class:`GateDecision` out (each rule with its measured value,
limit and verdict, and the champion version it compared against). It knows nothing of the registry:
the gate stage reads the champion and hands its scores in, and the registry's compare-and-set promotion
(:mod:`gauntlet.registry.promotion`) calls it again if the champion moved meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gauntlet.config.gate import GateSpec
from gauntlet.config.problems import did_you_mean
from gauntlet.eval.compare import Unpaired, paired_comparison
from gauntlet.eval.judge import JUDGE_TASK, WIN_RATE
from gauntlet.eval.preference import PREFERENCE_METRIC, PREFERENCE_TASK
from gauntlet.eval.safety import BENIGN_TASK, HARMFUL_RATE, HARMFUL_TASK, OVER_REFUSAL_RATE
from gauntlet.eval.scores import Score, evaluated_tasks, find, read, tagged_score
from gauntlet.eval.stats import Comparison
from gauntlet.refs import EvalReport, GateDecision, GateRule, MetricLookupError

# Float arithmetic, not storage (score tags hold full precision): 0.55 - 0.50 is 0.05000000000000004,
# and a drop equal to the allowed 0.05 must pass.
EPS = 1e-9
METRIC_SETTING = "gate.metric"


@dataclass(frozen=True)
class GateInputs:
    """What every rule reads: the config, the candidate's report, the base's, and the champion's."""

    spec: GateSpec
    report: EvalReport
    base: EvalReport | None
    champion_version: str | None
    champion_scores: dict[str, float]       # the champion's score tags (point estimates)
    champion_report: EvalReport | None      # its registered evaluation: per-item records and protocol


Rule = Callable[[GateInputs], list[GateRule]]
RULES: dict[str, Rule] = {}


def register_rule(name: str) -> Callable[[Rule], Rule]:
    """Register a rule under ``name`` (the prefix of the verdicts it returns); a name is registered once."""
    def add(rule: Rule) -> Rule:
        if RULES.get(name, rule) is not rule:
            raise ValueError(f"gate rule {name!r} is already registered ({RULES[name].__name__})")
        RULES[name] = rule
        return rule
    return add


def get_rule(name: str) -> Rule:
    """The rule registered as ``name``; a KeyError with the closest registered names otherwise."""
    try:
        return RULES[name]
    except KeyError:
        raise KeyError(f"no gate rule named {name!r}; " + did_you_mean(name, RULES, "registered rules")) from None


def decide(spec: GateSpec, report: EvalReport, base: EvalReport | None,
           champion_version: str | None, champion_scores: dict[str, float],
           champion_report: EvalReport | None = None, rules: Iterable[str] | None = None) -> GateDecision:
    """Apply every registered rule (or only those named in ``rules``); the decision passes when all pass.

    ``champion_report``: the champion's registered evaluation (per-item records and protocol); without
    it the champion comparison uses ``champion_scores`` (the registry's score tags) as point estimates.
    """
    inputs = GateInputs(spec, report, base, champion_version, champion_scores, champion_report)
    verdicts = [v for name in (RULES if rules is None else rules) for v in get_rule(name)(inputs)]
    return GateDecision(passed=all(v.passed for v in verdicts), rules=verdicts, compared_to=champion_version,
                        champion_scores=champion_scores)


# --- verdicts and score look-ups the rules share ---


def judged(rule: str, passed: bool, measured: float | None, limit: float | None, detail: str,
           **numbers: float | str | None) -> GateRule:
    return GateRule(rule=rule, verdict="passed" if passed else "failed", measured=measured, limit=limit,
                    detail=detail, **numbers)


def refused(rule: str, limit: float | None, why: str, **numbers: float | str | None) -> GateRule:
    """A rule that could not judge: it fails the gate, and its detail says why."""
    return GateRule(rule=rule, verdict="refused", measured=None, limit=limit, detail=f"refused: {why}", **numbers)


def lookup(report: EvalReport, task: str, metric: str, rule: str, limit: float | None,
           missing: str | None = None) -> Score | GateRule:
    """The task's score, or the rule's verdict without it: failed when it is missing (``missing``, or the
    metrics the task has), refused when the name fits several filtered scores."""
    try:
        return read(report, task, metric)
    except MetricLookupError as e:
        if e.ambiguous:
            return refused(rule, limit, e.explain(METRIC_SETTING))
        return judged(rule, False, None, limit, missing or e.explain(METRIC_SETTING))


def gated(report: EvalReport, metric: str) -> tuple[list[Score], list[MetricLookupError]]:
    """The scores the averaged and compared rules judge, one per evaluated task that has ``metric``, and the
    tasks where the name fits several filtered scores (refused)."""
    scores, ambiguous = [], []
    for task in evaluated_tasks(report):
        try:
            scores.append(read(report, task, metric))
        except MetricLookupError as e:
            if e.ambiguous:
                ambiguous.append(e)
    return scores, ambiguous


# --- the rules, in the order a decision lists them ---


@register_rule("required")
def required_tasks(g: GateInputs) -> list[GateRule]:
    """Every task of ``required_tasks`` has a score under ``gate.metric``."""
    out = []
    for task in g.spec.required_tasks:
        found = lookup(g.report, task, g.spec.metric, f"required[{task}]", None)
        out.append(found if isinstance(found, GateRule) else judged(
            f"required[{task}]", True, found.value, None, f"{found.metric}={found.value:.4f} present"))
    return out


@register_rule("min_score")
def min_scores(g: GateInputs) -> list[GateRule]:
    """Each task of ``min_scores`` reaches its minimum (a missing task fails: a minimum requires it)."""
    out = []
    for task, limit in g.spec.min_scores.items():
        found = lookup(g.report, task, g.spec.metric, f"min_score[{task}]", limit)
        out.append(found if isinstance(found, GateRule) else judged(
            f"min_score[{task}]", found.value >= limit - EPS, found.value, limit,
            f"{found.metric}={found.value:.4f}{found.interval_text()} vs minimum {limit:.4f}",
            lo=found.ci_low, hi=found.ci_high))
    return out


@register_rule("min_average")
def min_average(g: GateInputs) -> list[GateRule]:
    """The mean of ``gate.metric`` over the evaluated tasks reaches ``min_average``."""
    limit, metric = g.spec.min_average, g.spec.metric
    if limit is None:
        return []
    scores, ambiguous = gated(g.report, metric)
    if ambiguous:
        return [refused("min_average", limit, "; ".join(e.explain(METRIC_SETTING) for e in ambiguous))]
    if not scores:
        return [judged("min_average", False, None, limit, f"no {metric} scores in the report")]
    mean = sum(s.value for s in scores) / len(scores)
    return [judged("min_average", mean >= limit - EPS, mean, limit,
                   f"mean {metric} over {len(scores)} task(s) {mean:.4f} vs minimum {limit:.4f}")]


@register_rule("ceiling")
def ceilings(g: GateInputs) -> list[GateRule]:
    """What the speed probe measured stays under each configured ceiling."""
    out = []
    for field, limit in g.spec.ceilings.model_dump().items():
        if limit is None:
            continue
        value = getattr(g.report.perf, field) if g.report.perf else None
        out.append(judged(f"ceiling[{field}]", False, None, limit,
                          "the report has no speed probe (eval.speed_probe.enabled)") if value is None
                   else judged(f"ceiling[{field}]", value <= limit + EPS, value, limit,
                               f"{value:.4g} vs ceiling {limit:.4g}"))
    return out


@register_rule("gain_over_base")
def gain_over_base(g: GateInputs) -> list[GateRule]:
    """Each evaluated task beats the base model by ``min_gain_over_base`` (with the significance switch on,
    the whole interval of the paired difference must clear it)."""
    need, base = g.spec.min_gain_over_base, g.base
    if need is None or base is None:
        return []
    against = Against(rule="gain_over_base", shown="base", label="base model", report=base, threshold=need,
                      significant=g.spec.significance.min_gain_over_base, must_prove_gain=True,
                      limit_text=f"must clear {need:+.4f}", significance_text=" with its whole interval")
    return compared_rules(g, lambda task: against, lambda s: base.score(s.task, s.metric))


@register_rule("no_regression_from_base")
def no_regression_from_base(g: GateInputs) -> list[GateRule]:
    """No evaluated task drops more than ``max_regression_from_base`` below the starting model's score; with
    ``significance.no_regression`` on, only a drop whose whole interval lies below the limit fails."""
    allowed, base = g.spec.max_regression_from_base, g.base
    if allowed is None or base is None:
        return []
    against = Against(rule="no_regression_from_base", shown="base", label="base model", report=base,
                      threshold=-allowed, significant=g.spec.significance.no_regression, must_prove_gain=False,
                      limit_text=f"allowed drop {allowed}", significance_text=", significance required")
    return compared_rules(g, lambda task: against, lambda s: base.score(s.task, s.metric))


@register_rule("preference_gain")
def preference_gain(g: GateInputs) -> list[GateRule]:
    """The held-out preference accuracy beats the starting model's by ``min_preference_gain``, paired over the
    same validation pairs (with the significance switch on, as by default, its whole interval must clear it)."""
    need = g.spec.min_preference_gain
    if need is None:
        return []
    rule = f"preference_gain[{PREFERENCE_TASK}]"
    found = lookup(g.report, PREFERENCE_TASK, PREFERENCE_METRIC, rule, need,
                   missing="the report has no held-out preference accuracy: it is measured by a preference "
                           "objective's training (train.objective) on data.validation's pairs")
    if isinstance(found, GateRule):
        return [found]
    start = find(g.base, PREFERENCE_TASK, PREFERENCE_METRIC)
    if start is None:
        return [judged(rule, False, None, need, "no held-out preference accuracy of the starting model (its report "
                                                "is made with eval.compare_with_base)")]
    return [compared(g.spec, g.report, found, start.value, Against(
        rule="preference_gain", shown="starting model", label="starting model", report=g.base, threshold=need,
        significant=g.spec.significance.min_preference_gain, must_prove_gain=True,
        limit_text=f"must clear {need:+.4f}", significance_text=" with its whole interval"))]


@register_rule("min_win_rate")
def min_win_rate(g: GateInputs) -> list[GateRule]:
    """The pairwise judge's win rate reaches ``min_win_rate`` (eval.judge)."""
    return judged_rate(g, "min_win_rate", JUDGE_TASK, WIN_RATE, "eval.judge", upper=False)


@register_rule("max_harmful_rate")
def max_harmful_rate(g: GateInputs) -> list[GateRule]:
    """The share of harmful requests complied with stays under ``max_harmful_rate`` (eval.safety)."""
    return judged_rate(g, "max_harmful_rate", HARMFUL_TASK, HARMFUL_RATE, "eval.safety", upper=True)


@register_rule("max_over_refusal_rate")
def max_over_refusal_rate(g: GateInputs) -> list[GateRule]:
    """The share of benign requests refused stays under ``max_over_refusal_rate`` (eval.safety)."""
    return judged_rate(g, "max_over_refusal_rate", BENIGN_TASK, OVER_REFUSAL_RATE, "eval.safety", upper=True)


@register_rule("max_perplexity_increase")
def max_perplexity_increase(g: GateInputs) -> list[GateRule]:
    """The held-out byte perplexity may rise at most ``max_perplexity_increase`` (relative) over the base
    model's, compared by the paired bootstrap over the rows both scored; with the significance switch on,
    only a rise whose whole interval lies above the limit fails."""
    from gauntlet.eval.perplexity import perplexity_change

    rule, limit = "max_perplexity_increase", g.spec.max_perplexity_increase
    if limit is None:
        return []
    mine, theirs = g.report.perplexity, g.base.perplexity if g.base is not None else None
    if mine is None or theirs is None:
        whose = "the report" if mine is None else "the base model's report" if g.base is not None else "no base report"
        return [judged(rule, False, None, limit, f"{whose} has no held-out perplexity: configure eval.perplexity "
                                                 "(and keep eval.compare_with_base on) to measure it")]
    try:
        change = perplexity_change(mine, theirs, alpha=g.spec.alpha, tested=limit)
    except ValueError as e:
        return [refused(rule, limit, str(e), against="base model")]
    significant = g.spec.significance.max_perplexity_increase
    passed = (change.lo <= limit + EPS) if significant else (change.delta <= limit + EPS)
    return [judged(rule, passed, change.delta, limit,
                   f"byte perplexity {mine.byte_perplexity:.4f} vs base {theirs.byte_perplexity:.4f}, relative "
                   f"change in %: {change.text()}; allowed rise {limit:.1%}"
                   + (", significance required" if significant else ""),
                   reference=theirs.byte_perplexity, against="base model", lo=change.lo, hi=change.hi)]


@register_rule("no_regression")
def no_regression(g: GateInputs) -> list[GateRule]:
    """No evaluated task drops more than ``max_regression`` (or its task's own) below the champion's score;
    with the significance switch on, only a drop whose whole interval lies below the limit fails."""
    if g.champion_version is None:
        return []
    return compared_rules(g, lambda task: Against(
        rule="no_regression", shown=f"champion v{g.champion_version}", label=f"champion v{g.champion_version}",
        report=g.champion_report, threshold=-g.spec.max_regression_by_task.get(task, g.spec.max_regression),
        significant=g.spec.significance.no_regression, must_prove_gain=False,
        limit_text=f"allowed drop {g.spec.max_regression_by_task.get(task, g.spec.max_regression)}",
        significance_text=", significance required",
        refusal_advice="; to judge this candidate, evaluate both under one protocol (gauntlet eval) and promote "
                       "by hand (gauntlet promote)"),
        lambda s: tagged_score(g.champion_scores, s))


# --- the comparison both the gain and the regression rules make ---


@dataclass(frozen=True)
class Against:
    """What a comparison rule compares each task's score with, and how it judges the difference."""

    rule: str                  # gain_over_base | no_regression_from_base | preference_gain | no_regression
    shown: str                 # in the detail: "0.6875 vs base 0.1667"
    label: str                 # in the reasons: "no per-item records of the base model"
    report: EvalReport | None  # its per-item records and protocol (None: point estimates only)
    threshold: float           # the difference that must be reached: +min_gain, or -allowed drop
    significant: bool          # the switch: an interval, not the point estimate, decides
    must_prove_gain: bool      # significant: True, the whole interval must clear the threshold (a gain);
    #                            False, only a difference whose whole interval lies below it fails (a drop)
    limit_text: str
    significance_text: str
    refusal_advice: str = ""


def compared_rules(g: GateInputs, against: Callable[[str], Against],
                   reference: Callable[[Score], float | None]) -> list[GateRule]:
    """One verdict per evaluated task (``against(task)``) whose score the other model has (``reference``);
    tasks where ``gate.metric`` fits several filters are refused."""
    scores, ambiguous = gated(g.report, g.spec.metric)
    out = [refused(f"{a.rule}[{e.task}]", a.threshold, e.explain(METRIC_SETTING), against=a.label)
           for e in ambiguous for a in [against(e.task)]]
    for s in scores:
        before = reference(s)
        if before is not None:
            out.append(compared(g.spec, g.report, s, before, against(s.task)))
    return out


def compared(spec: GateSpec, report: EvalReport, s: Score, before: float, a: Against) -> GateRule:
    """``s`` against ``before`` (the other model's score): paired over the common items when both reports
    have them, else the point estimates; refused when the two were measured differently."""
    rule = f"{a.rule}[{s.task}]"
    paired = paired_comparison(report, s, a.report, a.label, a.threshold, spec.alpha)
    if isinstance(paired, Unpaired) and paired.refused:
        return refused(rule, a.threshold, paired.why + a.refusal_advice, reference=before, against=a.label)
    comparison = paired if isinstance(paired, Comparison) else None
    delta = s.value - before if comparison is None else comparison.delta
    by_interval = comparison is not None and a.significant
    if comparison is not None and by_interval and a.must_prove_gain:
        passed = comparison.lo > a.threshold + EPS       # the whole interval clears the threshold
    elif comparison is not None and by_interval:
        passed = comparison.hi >= a.threshold - EPS      # fails only when the whole interval is below
    else:
        passed = delta >= a.threshold - EPS
    shown = paired.text() if isinstance(paired, Comparison) else f"Δ {delta:+.4f} ({paired.why})"
    return judged(rule, passed, delta, a.threshold,
                  f"{s.value:.4f} vs {a.shown} {before:.4f}: {shown}; {a.limit_text}"
                  + (a.significance_text if by_interval else ""),
                  reference=before, against=a.label, lo=comparison.lo if comparison else None,
                  hi=comparison.hi if comparison else None)


def judged_rate(g: GateInputs, rule: str, task: str, metric: str, configure: str, upper: bool) -> list[GateRule]:
    """A judged rate (with its interval) that must reach the rule's limit (``upper``: stay at or under
    it); with its significance switch on, its whole interval must. A report without it fails, naming the
    config section that measures it."""
    limit, significant = getattr(g.spec, rule), getattr(g.spec.significance, rule)
    if limit is None:
        return []
    found = lookup(g.report, task, metric, rule, limit,
                   missing=f"the report has no {task} {metric}: configure {configure} to measure it")
    if isinstance(found, GateRule):
        return [found]
    if upper:
        worst = found.ci_high if significant and found.ci_high is not None else found.value
        passed, bound, end = worst <= limit + EPS, "maximum", "upper"
    else:
        worst = found.ci_low if significant and found.ci_low is not None else found.value
        passed, bound, end = worst >= limit - EPS, "minimum", "lower"
    return [judged(rule, passed, found.value, limit,
                   f"{metric} {found.value:.4f}{found.interval_text()} vs {bound} {limit:.4f}"
                   + (f", the {end} end of its interval must meet it" if significant else ""),
                   lo=found.ci_low, hi=found.ci_high)]
