"""Deciding one canary step: healthy, breached (roll back), or not enough traffic to judge. Pure rules.

The quality probe is judged by the gate's own rule (:func:`gauntlet.gate.decide`, ``max_regression``) with
stable in the champion's place: a canary whose probe score drops more than ``max_quality_drop`` below
stable's fails exactly as a regression fails the gate.
"""

from __future__ import annotations

from pydantic import BaseModel

from gauntlet.config.deploy import Thresholds
from gauntlet.config.gate import GateSpec
from gauntlet.deploy.watch import StepReport
from gauntlet.names import metric_key
from gauntlet.refs import EvalReport, TaskScore

PROBE_TASK, PROBE_METRIC = "probe", "exact_match"


class Verdict(BaseModel):
    healthy: bool
    judged: bool = True               # False: too few canary requests in the window to say
    reasons: list[str] = []           # every breached threshold, with its numbers


def probe_report(score: float) -> EvalReport:
    return EvalReport(model="canary", model_sha="-", variant="canary", protocol={}, versions={}, timestamp="-",
                      report_path="-", scores=[TaskScore(task=PROBE_TASK, metric=PROBE_METRIC, value=score)])


def quality_breach(canary: float | None, stable: float | None, max_drop: float, stable_version: str) -> str | None:
    from gauntlet.gate import decide

    if canary is None or stable is None:
        return None
    decision = decide(GateSpec(metric=PROBE_METRIC, max_regression=max_drop), probe_report(canary), None,
                      stable_version, {metric_key(PROBE_TASK, PROBE_METRIC): stable})
    failed = [r.detail for r in decision.rules if not r.passed]
    return f"quality probe: {failed[0]}" if failed else None


def judge(report: StepReport, t: Thresholds, stable_version: str = "stable") -> Verdict:
    c, s = report.canary, report.stable
    reasons = []
    if c.error_rate > t.max_error_rate:
        reasons.append(f"error rate {c.error_rate:.1%} ({c.errors}/{c.requests}) over {t.max_error_rate:.1%}")
    if c.probe_errors and c.probe_score is None:
        reasons.append(f"the quality probe got no answer from the canary ({c.probe_errors} failed requests)")
    if c.p95_s is not None and c.p95_s > t.max_p95_latency_s:
        reasons.append(f"p95 latency {c.p95_s:.3f} s over {t.max_p95_latency_s} s")
    if t.max_p95_ratio and c.p95_s is not None and s.p95_s and c.p95_s > t.max_p95_ratio * s.p95_s:
        reasons.append(f"p95 latency {c.p95_s:.3f} s is {c.p95_s / s.p95_s:.1f}x stable's {s.p95_s:.3f} s "
                       f"(limit {t.max_p95_ratio}x)")
    if t.min_tokens_per_s_ratio and c.tokens_per_s is not None and s.tokens_per_s and \
            c.tokens_per_s < t.min_tokens_per_s_ratio * s.tokens_per_s:
        reasons.append(f"{c.tokens_per_s:.1f} tokens/s is under {t.min_tokens_per_s_ratio}x stable's "
                       f"{s.tokens_per_s:.1f}")
    quality = quality_breach(c.probe_score, s.probe_score, t.max_quality_drop, stable_version)
    if quality:
        reasons.append(quality)
    if report.drift is not None and report.drift.psi > max(t.max_drift_psi, report.drift.noise_floor):
        reasons.append(f"input drift: PSI {report.drift.psi:.3f} over {t.max_drift_psi} and over the "
                       f"{report.drift.noise_floor:.3f} that sampling alone reaches "
                       f"(length {report.drift.psi_length:.3f}, vocabulary {report.drift.psi_vocabulary:.3f}; "
                       f"{report.drift.served} served prompts)")
    if reasons:
        return Verdict(healthy=False, reasons=reasons)
    if c.requests < t.min_requests:
        return Verdict(healthy=False, judged=False,
                       reasons=[f"only {c.requests} canary request(s) in the window (min_requests {t.min_requests})"])
    return Verdict(healthy=True)
