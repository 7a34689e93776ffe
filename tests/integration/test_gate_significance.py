"""The gate knows noise from change: paired tests over real per-item records of a real evaluation.

One lm-eval evaluation of a tiny model on the demo's 48 facts is the champion; candidates are that same
report with items changed (one item worse; many items worse), so the difference is known exactly. The
champion's report goes through a real MLflow registry and back, as the gate stage reads it.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from gauntlet.config.eval import EvalSpec, SpeedProbeSpec
from gauntlet.config.gate import GateSpec, Significance
from gauntlet.demo import data as demo_data
from gauntlet.refs import EvalReport

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TASK = "demo_facts"


@pytest.fixture(scope="module")
def champion(prefect_api, tmp_path_factory, tiny_model) -> EvalReport:
    from tests.helpers import evaluate_in_flow

    root = tmp_path_factory.mktemp("significance")
    path = tiny_model
    eval_path = root / "eval.jsonl"
    demo_data.write_jsonl(eval_path, demo_data.build(48, 7)["eval"])
    return evaluate_in_flow(path, EvalSpec(tasks=[TASK], speed_probe=SpeedProbeSpec(enabled=False)),
                            eval_file=eval_path)


def with_items(report: EvalReport, change) -> EvalReport:
    """``report`` with its demo_facts items changed by ``change(items) -> items`` and the score recomputed."""
    result = next(r for r in report.task_results if r.task == TASK)
    metric = result.metric
    items = change(dict(result.item_scores[metric]))
    value = statistics.fmean(items.values())
    scores = [s.model_copy(update={"value": value}) if (s.task, s.metric) == (TASK, metric) else s
              for s in report.scores]
    result = result.model_copy(update={"value": value, "item_scores": {**result.item_scores, metric: items},
                                       "scores": [s for s in scores if s.task == TASK]})
    return report.model_copy(update={"scores": scores, "task_results": [result]})


def one_item_worse(items: dict[str, float]) -> dict[str, float]:
    right = sorted(k for k, v in items.items() if v == 1.0)
    return {**items, right[0]: 0.0}


def all_wrong(items: dict[str, float]) -> dict[str, float]:
    return dict.fromkeys(items, 0.0)


def champion_scores(report: EvalReport) -> dict[str, float]:
    from gauntlet.names import metric_key

    return {metric_key(s.task, s.metric): s.value for s in report.scores}


def regression_rule(decision):
    return next(r for r in decision.rules if r.rule == f"no_regression[{TASK}]")


def test_the_report_carries_per_item_records_and_intervals(champion: EvalReport) -> None:
    result = champion.task_results[0]
    items = result.item_scores[result.metric]
    assert len(items) == 48 and set(items.values()) <= {0.0, 1.0}
    assert result.value == pytest.approx(statistics.fmean(items.values()))  # lm-eval's score is the items' mean
    primary = next(s for s in champion.scores if (s.task, s.metric) == (TASK, result.metric))
    assert primary.n == 48 and primary.ci_low < primary.value < primary.ci_high
    assert 0.2 < primary.ci_high - primary.ci_low < 0.35  # ±~14 points at 48 items: what "noise" means here


def test_one_item_worse_passes_with_significance_and_fails_without(champion: EvalReport) -> None:
    from gauntlet.gate import decide

    candidate = with_items(champion, one_item_worse)
    with_test = decide(GateSpec(metric="acc", max_regression=0.0), candidate, None, "1",
                       champion_scores(champion), champion)
    rule = regression_rule(with_test)
    assert with_test.passed and rule.passed, rule.detail
    assert rule.measured == pytest.approx(-1 / 48) and rule.lo < rule.measured < rule.hi   # the interval judged
    assert "not significant" in rule.detail and "0 better / 1 worse" in rule.detail and "95% CI" in rule.detail

    point = decide(GateSpec(metric="acc", max_regression=0.0, significance=Significance(no_regression=False)),
                   candidate, None, "1", champion_scores(champion), champion)
    assert not point.passed and not regression_rule(point).passed


def test_a_clearly_worse_candidate_fails_both_ways(champion: EvalReport) -> None:
    from gauntlet.gate import decide

    candidate = with_items(champion, all_wrong)
    for significance in (Significance(no_regression=True), Significance(no_regression=False)):
        decision = decide(GateSpec(metric="acc", max_regression=0.0, significance=significance), candidate, None,
                          "1", champion_scores(champion), champion)
        rule = regression_rule(decision)
        assert not rule.passed, (significance, rule.detail)
    assert "significant" in rule.detail and "not significant" not in decide(
        GateSpec(metric="acc"), candidate, None, "1", champion_scores(champion), champion).rules[0].detail


def test_gain_over_base_can_require_its_whole_interval(champion: EvalReport) -> None:
    from gauntlet.gate import decide

    base = with_items(champion, one_item_worse)  # the candidate (the champion's report) is one item better
    loose = decide(GateSpec(metric="acc", min_gain_over_base=0.0), champion, base, None, {})
    strict = decide(GateSpec(metric="acc", min_gain_over_base=0.0,
                             significance=Significance(min_gain_over_base=True)), champion, base, None, {})
    assert loose.passed and not strict.passed, strict.reasons
    assert "with its whole interval" in strict.reasons[0]


def test_a_champion_measured_differently_is_refused_naming_the_field(champion: EvalReport) -> None:
    from gauntlet.gate import decide

    settings = champion.protocol["task_settings"]
    other = champion.model_copy(update={"protocol": {**champion.protocol, "task_settings": {
        **settings, TASK: {**settings[TASK], "num_fewshot": 3}}}})
    decision = decide(GateSpec(metric="acc"), champion, None, "1", champion_scores(champion), other)
    rule = regression_rule(decision)
    assert not rule.passed and rule.measured is None and rule.verdict == "refused"
    assert f"task_settings[{TASK}].num_fewshot: None != 3" in rule.detail and "refused" in rule.detail


def test_the_champions_report_travels_with_its_registered_version(champion: EvalReport, tmp_path: Path) -> None:
    import uuid

    from gauntlet.registry.reports import log_version_report, version_report
    from gauntlet.tracking import client, experiment_id, tracking_uri

    c = client(tracking_uri())
    name = f"significance-{uuid.uuid4().hex[:6]}"
    run = c.create_run(experiment_id(c, "significance-tests"))
    c.create_registered_model(name)
    mv = c.create_model_version(name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    assert version_report(c, name, str(mv.version)) is None  # registered before reports were kept
    log_version_report(c, run.info.run_id, champion)
    assert version_report(c, name, str(mv.version)) == champion
