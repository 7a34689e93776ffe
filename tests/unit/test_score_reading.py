"""One way to read a score (``gauntlet.eval.scores``): the gate and the leaderboard resolve every metric name
alike, on real EvalReports of two filtered generation tasks: ``demo_facts_gen`` (one filter, first-word)
and ``gsm8k`` (two, strict-match and flexible-extract). A name without a filter finds the only filtered
score; a name fitting two filters is refused by both, naming both."""

from __future__ import annotations

from pathlib import Path

import pytest

from gauntlet.config.gate import GateSpec
from gauntlet.config.leaderboard import LeaderboardSpec
from gauntlet.eval.scores import read
from gauntlet.leaderboard.board import build_leaderboard
from gauntlet.leaderboard.candidates import CandidateOutcome
from gauntlet.refs import EvalReport, MetricLookupError, TaskResult, TaskScore

ONE_FILTER, TWO_FILTERS = "demo_facts_gen", "gsm8k"
N = 20
# each filter's items: right on the first k of N (so each score differs and comes from its items)
RIGHT = {(ONE_FILTER, "exact_match,first-word"): 12,
         (TWO_FILTERS, "exact_match,strict-match"): 5, (TWO_FILTERS, "exact_match,flexible-extract"): 9}
NAMES = ["exact_match", "exact_match,first-word", "exact_match,strict-match", "exact_match,flexible-extract",
         "exact_match,none", "acc"]
PROTOCOL = {"backend": "hf", "limit": None, "tasks": [ONE_FILTER, TWO_FILTERS]}


def generation_report(shift: int = 0, model: str = "m") -> EvalReport:
    """Both tasks as lm-eval reports them (``metric,filter`` per filter), with per-item records;
    ``shift`` more items right under every filter."""
    results, scores = [], []
    for task, reported in ((ONE_FILTER, "exact_match,first-word"), (TWO_FILTERS, "exact_match,strict-match")):
        items = {m: {f"{task}/{i}": float(i < k + shift) for i in range(N)} for (t, m), k in RIGHT.items() if t == task}
        task_scores = [TaskScore(task=task, metric=m, value=sum(v.values()) / N, ci_low=0.0, ci_high=1.0, n=N)
                       for m, v in items.items()]
        scores += task_scores
        results.append(TaskResult(
            task=task, engine_task=task, source="local", metric=reported, value=task_scores[0].value,
            random_baseline=0.0, random_baseline_source="generated answers: chance is 0", scores=task_scores,
            versions={task: "1.0"}, num_fewshot=0, item_scores=items, results_path="/dev/null",
            samples_path="/dev/null"))
    return EvalReport(model=model, model_sha=f"sha-{model}", scores=scores, task_results=results, protocol=PROTOCOL,
                      versions={"lm_eval": "0.4.13"}, timestamp="2026-01-01T02:00:00+00:00", report_path="/dev/null")


def board_spec(tmp_path: Path, key: str, metric: str) -> LeaderboardSpec:
    data = tmp_path / "eval.jsonl"
    data.write_text("{}\n")
    return LeaderboardSpec.model_validate({
        "name": "unit", "candidates": [{"source": "demo://tiny-llama"}], "eval_file": str(data),
        "eval": {"tasks": [ONE_FILTER, TWO_FILTERS]}, "ranking": {"key": key, "metric": metric}})


def outcome(name: str, report: EvalReport) -> CandidateOutcome:
    return CandidateOutcome(candidate=name, variant="bf16", source=f"/models/{name}", status="ok",
                            model_sha=report.model_sha, report=report)


@pytest.mark.parametrize("task", [ONE_FILTER, TWO_FILTERS])
@pytest.mark.parametrize("metric", NAMES)
def test_the_gate_and_the_board_read_the_same_score_under_every_name(tmp_path: Path, task: str, metric: str) -> None:
    from gauntlet.gate import decide

    report = generation_report()
    (rule,) = decide(GateSpec(metric=metric, min_scores={task: 0.0}), report, None, None, {}).rules
    board = build_leaderboard(board_spec(tmp_path, f"task:{task}", metric),
                              [outcome("a", report), outcome("b", generation_report(shift=4, model="b"))], [])
    row = board.row("a", "bf16")
    assert row.raw[task] == rule.measured                      # the same value, or both without one
    if rule.passed:
        assert row.rank is not None and row.intervals[task] is not None   # ranked, with its bootstrap interval
        expected = next(k for (t, m), k in RIGHT.items() if t == task and m.startswith(metric)) / N
        assert rule.measured == pytest.approx(expected)
    else:
        assert row.rank is None and row.reason.startswith(f"not ranked by task:{task}: missing ")
        assert any(m.startswith(f"{task}.{metric}") for m in row.missing), row.missing
    fits = sorted(m for (t, m) in RIGHT if t == task and m.partition(",")[0] == metric)
    if len(fits) > 1:   # a name fitting two filters: refused by both, naming both
        assert rule.verdict == "refused" and all(repr(m) in rule.detail for m in fits), rule.detail
        assert all(repr(m) in row.reason for m in fits) and "ranking.task_metrics.gsm8k" in row.reason
    else:
        assert rule.verdict != "refused"


def test_a_name_without_a_filter_ranks_the_one_filter_task_and_refuses_the_two_filter_one(tmp_path: Path) -> None:
    from gauntlet.gate import decide

    weak, strong = generation_report(), generation_report(shift=6, model="strong")
    board = build_leaderboard(board_spec(tmp_path, f"task:{ONE_FILTER}", "exact_match"),
                              [outcome("weak", weak), outcome("strong", strong)], [])
    assert [(r.candidate, r.raw[ONE_FILTER]) for r in board.ranked()] == [("strong", 0.9), ("weak", 0.6)]
    # averaged over both tasks, the two-filter task is missing: unranked, naming both filters
    board = build_leaderboard(board_spec(tmp_path, "average", "exact_match"), [outcome("weak", weak)], [])
    (row,) = board.rows
    assert row.rank is None and row.missing == [
        f"{TWO_FILTERS}.exact_match ('exact_match' fits 2 filtered scores of task 'gsm8k': "
        "['exact_match,flexible-extract', 'exact_match,strict-match']; set ranking.task_metrics.gsm8k to one of them)"]
    # the gate's averaged and compared rules refuse it the same way, and judge the one-filter task
    decision = decide(GateSpec(metric="exact_match", min_average=0.1, max_regression=0.0, min_gain_over_base=0.0),
                      strong, weak, "4", {f"{ONE_FILTER}.exact_match/first-word": 0.6})
    verdicts = {r.rule: r.verdict for r in decision.rules}
    assert verdicts == {"min_average": "refused", f"gain_over_base[{TWO_FILTERS}]": "refused",
                        f"gain_over_base[{ONE_FILTER}]": "passed", f"no_regression[{TWO_FILTERS}]": "refused",
                        f"no_regression[{ONE_FILTER}]": "passed"}
    assert not decision.passed and all("'exact_match,strict-match'" in r for r in decision.reasons)


def test_a_read_score_carries_its_interval_items_and_normalised_value() -> None:
    report = generation_report()
    score = read(report, ONE_FILTER, "exact_match")
    assert (score.metric, score.value, score.n) == ("exact_match,first-word", 0.6, N)
    assert score.items == report.task_results[0].item_scores["exact_match,first-word"]
    assert score.normalized == pytest.approx(60.0) and score.interval_text() == " (95% CI 0.0000…1.0000)"
    with pytest.raises(MetricLookupError) as err:
        read(report, TWO_FILTERS, "exact_match")
    assert err.value.ambiguous and err.value.known == ["exact_match,flexible-extract", "exact_match,strict-match"]
    with pytest.raises(MetricLookupError) as err:
        read(report, "mmlu", "acc")
    assert err.value.kind == "task" and "its tasks: ['demo_facts_gen', 'gsm8k']" in err.value.explain("gate.metric")


def test_a_name_fitting_several_filters_of_a_local_task_is_refused_at_validation(tmp_path: Path) -> None:
    """Where the task's YAML is in the project (arith_chat: strict-match and last-number), the board's config is
    refused before any night, naming both filters and the fix (the run config's gate.metric: the bad-input corpus,
    case gate_metric_ambiguous); a filtered name, or task_metrics naming one, validates."""
    from pydantic import ValidationError

    def spec(ranking: dict) -> LeaderboardSpec:
        data = tmp_path / "eval.jsonl"
        data.write_text("{}\n")
        return LeaderboardSpec.model_validate({"name": "unit", "candidates": [{"source": "demo://tiny-llama"}],
                                               "eval_file": str(data), "eval": {"tasks": ["arith_chat"]},
                                               "ranking": ranking})

    with pytest.raises(ValidationError) as refused:
        spec({"metric": "exact_match"})
    assert "metric 'exact_match' fits 2 filters of task arith_chat: strict-match, last-number" in str(refused.value)
    assert "arith_chat: 'exact_match,strict-match'" in str(refused.value)
    assert spec({"metric": "exact_match,last-number"}).ranking.metric == "exact_match,last-number"
    assert spec({"metric": "exact_match", "task_metrics": {"arith_chat": "exact_match,strict-match"}})
