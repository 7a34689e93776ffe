"""Stage ``safety``: the candidate's harmful-compliance and over-refusal rates, judged with a rubric
(gauntlet/eval/safety.py).

Key: the candidate's content hash, the safety protocol (the judge: its content hash for a model judge,
base_url and endpoint model for an endpoint, never its key; the rubric's sha256; both sets' md5; the answers'
decoding) and the judge's batch size. The answers are the judge's ``answer`` stage on each set, cached per
model and set.
"""

from __future__ import annotations

from gauntlet.config.eval import SafetySpec
from gauntlet.config.judge import JudgeSpec
from gauntlet.eval.judge import load_instructions, with_results
from gauntlet.eval.safety import SafetyReport, classify, rate_result, rubric_template, safety_protocol, write_items
from gauntlet.files import write_json
from gauntlet.project import in_project
from gauntlet.refs import EvalReport, ModelRef
from gauntlet.tasks._stage import StageRun, stage
from gauntlet.tasks.judge import answer, fetch_judge_model, judge_of
from gauntlet.tracking import RunContext


def safety_protocol_of(spec: SafetySpec, judge: JudgeSpec, judge_model: ModelRef | None) -> dict:
    return safety_protocol(spec, judge.judge_identity(), judge_model.sha if judge_model else None,
                           in_project(spec.rubric), in_project(spec.harmful), in_project(spec.benign),
                           judge.tie_margin)


@stage("safety", key=lambda spec, judge, candidate, judge_model: [
           candidate.sha, safety_protocol_of(spec, judge, judge_model), judge.batch_size],
       outputs=lambda report, _: [report.harmful.results_path, report.over_refusal.results_path],
       params=lambda spec, judge, candidate, judge_model: {
           **{f"judge.{k}": v for k, v in judge.judge_identity().items()}, "safety.rubric": spec.rubric,
           "safety.harmful": spec.harmful, "safety.benign": spec.benign, "candidate.sha": candidate.sha},
       retries=1, retry_delay_seconds=5, run_name="safety-{candidate.name}")
def safety(spec: SafetySpec, judge: JudgeSpec, candidate: ModelRef, judge_model: ModelRef | None,
           stage: StageRun) -> SafetyReport:
    nested = stage.nested()
    template = rubric_template(in_project(spec.rubric))
    judge_impl = judge_of(judge, judge_model)
    protocol = safety_protocol_of(spec, judge, judge_model)
    results = {}
    for which in ("harmful", "benign"):
        path = getattr(spec, which)
        asked = judge.model_copy(update={"instructions": path, "max_new_tokens": spec.max_new_tokens,
                                         "limit": spec.limit})
        replies = answer(spec=asked, model=candidate, run=nested)
        rows = load_instructions(in_project(path), spec.limit)
        stage.log.info(f"judging {len(rows)} replies to the {which} set (both label orders) with "
                       f"{judge.model or judge.base_url}")
        items = classify(judge_impl, template, rows, replies, judge.tie_margin)
        results[which] = rate_result(items, which, protocol, write_items(items, stage.out / f"{which}.jsonl"))
    report = SafetyReport(harmful=results["harmful"], over_refusal=results["benign"], protocol=protocol)
    write_json(stage.out / "safety_report.json", report.model_dump(mode="json"))
    stage.artifacts(stage.out / "harmful.jsonl", stage.out / "benign.jsonl", stage.out / "safety_report.json")
    for r in (report.harmful, report.over_refusal):
        s = r.scores[0]
        stage.metrics({r.metric: s.value, f"{r.metric}_ci_low": s.ci_low, f"{r.metric}_ci_high": s.ci_high})
        stage.log.info(f"{candidate.name}: {r.metric} {s.value:.1%} (95% CI {s.ci_low:.1%}…{s.ci_high:.1%}, n={s.n})")
    return report


def check_safety(spec: SafetySpec, judge: JudgeSpec, candidate: ModelRef, report: EvalReport,
                 run: RunContext) -> EvalReport:
    """``report`` with the candidate's two safety rates added as the tasks ``safety_harmful`` and
    ``safety_over_refusal``."""
    judged = safety(spec=spec, judge=judge, candidate=candidate, judge_model=fetch_judge_model(judge, run), run=run)
    return with_results(report, [judged.harmful, judged.over_refusal])
