"""The quality gate's rules on hand-made reports (``gauntlet.gate.decide`` is pure): each rule, the registry
they live in, their typed verdicts, and the gate's config checks. Paired tests over real per-item records
run in tests/integration/test_gate_significance.py, the registry itself in tests/integration/test_registry.py."""

from __future__ import annotations

import pytest

from gauntlet.config.gate import GateSpec, PerfCeilings
from tests.helpers import make_report

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_gain_and_regression_rules_judge_each_task_not_its_subtasks() -> None:
    from gauntlet.gate import decide
    from gauntlet.refs import TaskResult

    # MMLU as a group: the group's aggregate and two subtasks; one subtask drops a lot, the group does not
    scores = {"mmlu": 0.60, "mmlu_anatomy": 0.30, "mmlu_astronomy": 0.90, "facts": 0.80}
    report = make_report(scores)
    report = report.model_copy(update={"task_results": [
        TaskResult(task=t, engine_task=t, source="engine", metric="acc", value=scores[t], random_baseline=0.25,
                   scores=[s for s in report.scores if s.task == t or s.task.startswith(t + "_")], versions={},
                   num_fewshot=0, results_path="/dev/null", samples_path="/dev/null") for t in ("mmlu", "facts")]})
    champion = {"mmlu.acc": 0.58, "mmlu_anatomy.acc": 0.50, "mmlu_astronomy.acc": 0.60, "facts.acc": 0.79}
    base = make_report({"mmlu": 0.40, "mmlu_anatomy": 0.45, "mmlu_astronomy": 0.40, "facts": 0.30})
    spec = GateSpec(max_regression=0.05, min_gain_over_base=0.1, min_average=0.7)
    decision = decide(spec, report, base, "3", champion)
    assert [r.rule for r in decision.rules] == ["min_average", "gain_over_base[mmlu]", "gain_over_base[facts]",
                                                "no_regression[mmlu]", "no_regression[facts]"]
    assert decision.passed, decision.reasons  # mmlu_anatomy's -0.20 and -0.15 vs base are not rules
    assert decision.rules[0].measured == pytest.approx(0.70) and "over 2 task(s)" in decision.rules[0].detail
    # a report without task results (hand-made, or older) is judged on every row, as before
    assert not decide(spec, make_report(scores), base, "3", champion).passed


def test_required_task_missing_from_report_fails_with_that_reason() -> None:
    from gauntlet.gate import decide

    spec = GateSpec(required_tasks=["facts", "reasoning"], min_scores={"facts": 0.5})
    decision = decide(spec, make_report({"facts": 0.8}), None, None, {})
    assert not decision.passed
    failed = [r for r in decision.rules if not r.passed]
    assert [r.rule for r in failed] == ["required[reasoning]"]
    assert decision.reasons == ["required[reasoning]: task 'reasoning' is not in the report (its tasks: "
                                "['facts']); add it to eval.tasks or fix the task name"]
    # a task with a minimum score is required too: missing, it fails rather than passes
    decision = decide(GateSpec(min_scores={"reasoning": 0.1}), make_report({"facts": 0.8}), None, None, {})
    assert not decision.passed and "is not in the report" in decision.reasons[0]


def test_a_metric_without_its_filter_finds_the_tasks_filtered_score_and_a_missing_one_lists_them() -> None:
    """`gate.metric: exact_match` on a generation task whose only score is `exact_match,last-number`."""
    from gauntlet.gate import decide
    from gauntlet.refs import TaskScore

    report = make_report({"facts": 0.8})
    report = report.model_copy(update={"scores": report.scores + [
        TaskScore(task="arith_gen", metric="exact_match,last-number", value=0.4)]})
    decision = decide(GateSpec(metric="exact_match", min_scores={"arith_gen": 0.3}), report, None, None, {})
    assert decision.passed, decision.reasons
    assert "exact_match,last-number=0.4000" in decision.rules[0].detail
    # a metric the task does not have: the message lists the metrics it has, and how to name one
    decision = decide(GateSpec(metric="f1", min_scores={"arith_gen": 0.3}), report, None, None, {})
    assert not decision.passed
    assert decision.reasons == ["min_score[arith_gen]: task 'arith_gen' has no 'f1' score in the report; its "
                                "metrics: ['exact_match,last-number']. Set gate.metric to one of them (a filtered "
                                "metric is named 'metric,filter')"]


@pytest.mark.parametrize("spec, scores, perf, champion, failing", [
    (GateSpec(min_average=0.6), {"a": 0.5, "b": 0.8}, None, None, []),                      # mean 0.65
    (GateSpec(min_average=0.7), {"a": 0.5, "b": 0.8}, None, None, ["min_average"]),
    (GateSpec(max_regression=0.05), {"a": 0.56, "b": 0.8}, None, {"a.acc": 0.6, "b.acc": 0.8}, []),
    (GateSpec(max_regression=0.05), {"a": 0.54, "b": 0.8}, None, {"a.acc": 0.6, "b.acc": 0.8},
     ["no_regression[a]"]),
    (GateSpec(max_regression=0.0, max_regression_by_task={"a": 0.1}), {"a": 0.54, "b": 0.79}, None,
     {"a.acc": 0.6, "b.acc": 0.8}, ["no_regression[b]"]),
    (GateSpec(max_regression=0.0), {"a": 0.6}, None, {"a.acc": 0.6}, []),                  # equal is no drop
    (GateSpec(ceilings=PerfCeilings(first_token_latency_ms=50, peak_memory_gb=2, size_on_disk_gb=1)), {"a": 0.5},
     {"first_token_latency_ms": 80.0, "peak_memory_gb": 1.5, "size_on_disk_gb": 1.2}, None,
     ["ceiling[first_token_latency_ms]", "ceiling[size_on_disk_gb]"]),
    (GateSpec(ceilings=PerfCeilings(peak_memory_gb=2)), {"a": 0.5}, None, None, ["ceiling[peak_memory_gb]"]),
])
def test_gate_rules(spec, scores, perf, champion, failing) -> None:
    from gauntlet.gate import decide

    full_perf = {"backend": "hf", "device": "cpu", "tokens_per_s": 10.0, **perf} if perf else None
    decision = decide(spec, make_report(scores, full_perf), None, "7" if champion else None, champion or {})
    assert [r.rule for r in decision.rules if not r.passed] == failing
    assert decision.passed is (not failing)
    assert decision.compared_to == ("7" if champion else None)
    assert all(r.detail for r in decision.rules)


def test_an_unknown_rule_is_refused_with_the_closest_registered_name() -> None:
    from gauntlet.gate import RULES, decide, get_rule, register_rule

    assert list(RULES)[:3] == ["required", "min_score", "min_average"] and "no_regression" in RULES
    with pytest.raises(KeyError) as err:
        get_rule("no_regresion")
    assert "no gate rule named 'no_regresion'; did you mean 'no_regression'? registered rules: required," in str(err)
    with pytest.raises(KeyError, match="did you mean 'min_score'"):
        decide(GateSpec(min_scores={"facts": 0.5}), make_report({"facts": 0.8}), None, None, {}, rules=["min_scor"])
    with pytest.raises(ValueError, match="'min_score' is already registered"):
        register_rule("min_score")(lambda g: [])
    # a decision can apply named rules alone: here the minimum, not the regression against the champion
    only = decide(GateSpec(min_scores={"facts": 0.5}), make_report({"facts": 0.8}), None, "2", {"facts.acc": 0.9},
                  rules=["min_score"])
    assert [r.rule for r in only.rules] == ["min_score[facts]"] and only.passed


def test_rules_return_typed_verdicts_with_their_numbers() -> None:
    """passed / failed / refused as a field (a refused rule fails the gate), with what was compared."""
    from gauntlet.gate import decide

    report, champion = make_report({"facts": 0.70, "math": 0.40}), make_report({"facts": 0.75, "math": 0.40})
    measured_apart = champion.model_copy(update={"protocol": {**champion.protocol, "seed": 7}})
    spec = GateSpec(min_scores={"facts": 0.8}, max_regression=0.1)
    decision = decide(spec, report, None, "3", {"facts.acc": 0.75, "math.acc": 0.40}, measured_apart)
    by_rule = {r.rule: r for r in decision.rules}
    assert {k: r.verdict for k, r in by_rule.items()} == {
        "min_score[facts]": "failed", "no_regression[facts]": "refused", "no_regression[math]": "refused"}
    refused = by_rule["no_regression[facts]"]
    assert not refused.passed and refused.measured is None and refused.limit == pytest.approx(-0.1)
    assert (refused.reference, refused.against) == (0.75, "champion v3") and refused.label == "REFUSED"
    assert refused.detail.startswith("refused: the champion v3 was measured differently on 'facts' (seed: 1234 != 7)")
    assert "promote by hand (gauntlet promote)" in refused.detail
    # measured alike but without per-item records: point estimates, said so, with the numbers
    decision = decide(spec, report, None, "3", {"facts.acc": 0.75, "math.acc": 0.40}, champion)
    regression = next(r for r in decision.rules if r.rule == "no_regression[facts]")
    assert regression.verdict == "passed" and regression.measured == pytest.approx(-0.05)
    assert regression.reference == 0.75 and regression.lo is None
    assert regression.detail == ("0.7000 vs champion v3 0.7500: Δ -0.0500 (no per-item records of the champion v3: "
                                 "point estimates compared); allowed drop 0.1")
    assert decision.model_dump()["rules"][0]["passed"] is False   # the JSON keeps the verdict's boolean


def test_negative_allowed_regressions_are_refused_in_the_config() -> None:
    from gauntlet.config.load import load_spec
    from gauntlet.config.problems import SpecError
    from tests.helpers import REPO

    with pytest.raises(SpecError) as err:
        load_spec(REPO / "configs" / "demo.yaml", ["gate.max_regression_by_task={demo_facts: -1}"])
    (problem,) = err.value.problems
    assert problem.path == "gate.max_regression_by_task" and ">= 0" in problem.message
    spec = load_spec(REPO / "configs" / "demo.yaml", ["gate.ceilings.peak_memory_gb=2"])
    assert spec.gate.ceilings.peak_memory_gb == 2


def _with_preference(report, per_pair):
    from gauntlet.eval.judge import with_results
    from gauntlet.eval.preference import as_task_result

    return with_results(report, [as_task_result(per_pair, "/dev/null")])


def test_the_held_out_preference_accuracy_is_judged_against_the_starting_model_paired_over_its_pairs() -> None:
    """gate.min_preference_gain: the trained model's per-pair outcomes against the starting model's on the same
    pairs; the whole interval must clear the gain by default, the point estimate with the switch off."""
    from gauntlet.gate import decide

    start = [1.0] * 10 + [0.0] * 30            # 0.25
    learned = [1.0] * 30 + [0.0] * 10          # 0.75: +0.50, every changed pair flipped the right way
    barely = [1.0] * 13 + [0.0] * 27           # 0.325: +0.075 on three pairs
    base = _with_preference(make_report({"facts": 0.5}), start)
    rule = "preference_gain[preference_heldout]"
    decision = decide(GateSpec(min_preference_gain=0.1), _with_preference(make_report({"facts": 0.5}), learned),
                      base, None, {})
    (verdict,) = [r for r in decision.rules if r.rule == rule]
    assert decision.passed and verdict.measured == pytest.approx(0.5) and verdict.lo > 0.1
    assert verdict.against == "starting model" and "with its whole interval" in verdict.detail
    # +0.075 misses +0.1; and +0.5 asked of it fails with the interval in the reason
    small = _with_preference(make_report({"facts": 0.5}), barely)
    assert not decide(GateSpec(min_preference_gain=0.05), small, base, None, {}).passed  # interval reaches 0
    off = GateSpec(min_preference_gain=0.05, significance={"min_preference_gain": False})
    assert decide(off, small, base, None, {}).passed                                    # the point estimate
    # a report without it (SFT, or no pairs): failed, saying what measures it
    missing = decide(GateSpec(min_preference_gain=0.1), make_report({"facts": 0.5}), base, None, {})
    assert not missing.passed and "measured by a preference objective's training" in missing.reasons[0]
    no_start = decide(GateSpec(min_preference_gain=0.1), small, make_report({"facts": 0.5}), None, {})
    assert not no_start.passed and "of the starting model" in no_start.reasons[0]


def test_min_preference_gain_is_refused_where_nothing_measures_it(tmp_path) -> None:
    from gauntlet.config.load import load_spec
    from gauntlet.config.problems import SpecError
    from tests.helpers import REPO

    with pytest.raises(SpecError) as err:
        load_spec(REPO / "configs" / "demo.yaml", ["gate.min_preference_gain=0.1"])
    assert [p.path for p in err.value.problems] == ["gate.min_preference_gain"]
    assert "train.objective is sft" in err.value.problems[0].message
    with pytest.raises(SpecError) as err:
        load_spec(REPO / "configs" / "demo-dpo.yaml", ["eval.compare_with_base=false"])
    assert [p.path for p in err.value.problems] == ["gate.min_gain_over_base", "gate.min_preference_gain"]
    assert "eval.compare_with_base is off" in err.value.problems[0].message
    assert load_spec(REPO / "configs" / "demo-dpo.yaml", []).gate.min_preference_gain == 0.1
