"""The run's summary: what was trained on what, how it scored against its base, what the gate said.

Written as ``summary.md``/``summary.json`` into the parent MLflow run, shown as a Prefect markdown
artifact, and returned to the caller (the CLI prints it).
"""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.refs import DatasetRef, EvalReport, GateDecision, ModelRef, PromotionResult, TrainedModel
from tasks.tracking import RunContext, client


class ScoreRow(BaseModel):
    task: str
    metric: str
    base: float | None
    finetuned: float


class RunSummary(BaseModel):
    name: str
    mlflow_run_id: str
    tracking_uri: str
    data_md5: str
    base_model: str
    merged_model: str
    train_metrics: dict[str, float]
    scores: list[ScoreRow]
    perf: dict | None
    gate_passed: bool
    gate_reasons: list[str]
    promotion: str
    registered_version: str | None
    stage_runs: dict[str, str | None]

    def markdown(self) -> str:
        lines = [f"# Gauntlet run `{self.name}`", "",
                 f"- data version (DVC md5): `{self.data_md5}`", f"- base model: `{self.base_model}`",
                 f"- fine-tuned model: `{self.merged_model}`",
                 "- training: " + ", ".join(f"{k}={v:.4g}" for k, v in self.train_metrics.items()), "",
                 "| task | metric | base | fine-tuned | delta |", "|---|---|---|---|---|"]
        for s in self.scores:
            base = "—" if s.base is None else f"{s.base:.4f}"
            delta = "—" if s.base is None else f"{s.finetuned - s.base:+.4f}"
            lines.append(f"| {s.task} | {s.metric} | {base} | {s.finetuned:.4f} | {delta} |")
        if self.perf:
            lines += ["", "speed: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in self.perf.items())]
        lines += ["", f"**gate: {'PASSED' if self.gate_passed else 'FAILED'}**"]
        lines += [f"- {r}" for r in self.gate_reasons]
        lines += ["", f"registry: {self.promotion}"]
        return "\n".join(lines)


def summarize(name: str, data: DatasetRef, base_model: ModelRef, trained: TrainedModel,
              base_report: EvalReport | None, report: EvalReport, decision: GateDecision,
              promotion: PromotionResult, run: RunContext) -> RunSummary:
    rows = [ScoreRow(task=s.task, metric=s.metric, finetuned=s.value,
                     base=base_report.score(s.task, s.metric) if base_report else None) for s in report.scores]
    return RunSummary(
        name=name, mlflow_run_id=run.parent_run_id, tracking_uri=run.tracking_uri, data_md5=data.md5,
        base_model=f"{base_model.source} ({base_model.sha[:12]})", merged_model=trained.merged.path,
        train_metrics=trained.metrics, scores=rows, perf=report.perf.model_dump() if report.perf else None,
        gate_passed=decision.passed, gate_reasons=decision.reasons, promotion=promotion.message,
        registered_version=promotion.version,
        stage_runs={"fetch_model": base_model.mlflow_run_id, "train": trained.mlflow_run_id,
                    "evaluate_base": base_report.mlflow_run_id if base_report else None,
                    "evaluate": report.mlflow_run_id})


@task(name="summarize", cache_policy=NO_CACHE)
def summarize_task(name: str, data: DatasetRef, base_model: ModelRef, trained: TrainedModel,
                   base_report: EvalReport | None, report: EvalReport, decision: GateDecision,
                   promotion: PromotionResult, run: RunContext) -> RunSummary:
    summary = summarize(name, data, base_model, trained, base_report, report, decision, promotion, run)
    c = client(run.tracking_uri)
    rid = run.parent_run_id
    c.log_text(rid, summary.markdown(), "summary.md")
    c.log_dict(rid, summary.model_dump(mode="json"), "summary.json")
    for row in summary.scores:
        c.log_metric(rid, f"{row.task}.{row.metric}", row.finetuned)
        if row.base is not None:
            c.log_metric(rid, f"{row.task}.{row.metric}.base", row.base)
    c.log_metric(rid, "gate_passed", float(summary.gate_passed))
    # Cached stages ran in an earlier flow run: link the MLflow runs that produced their outputs.
    for stage, stage_run_id in summary.stage_runs.items():
        if stage_run_id:
            c.set_tag(rid, f"gauntlet.stage_run.{stage}", stage_run_id)
    create_markdown_artifact(summary.markdown(), key="run-summary", description=f"Gauntlet run {name}")
    return summary
