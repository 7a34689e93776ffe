"""Stage ``summarize``: the run's summary in its MLflow parent run and as a Prefect artifact.

Never cached, and no MLflow run of its own: it writes into the flow's run, linking the stage runs that
produced each (possibly cached) output.
"""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact

from gauntlet.names import metric_key, mlflow_name
from gauntlet.refs import DatasetRef, EvalReport, GateDecision, ModelRef, PromotionResult, QuantizedModel, TrainedModel
from gauntlet.summary import RunSummary, summarize as summary_of
from gauntlet.tasks._stage import StageRun, stage


@stage("summarize", mlflow=False)
def summarize(name: str, data: DatasetRef, base_model: ModelRef, trained: TrainedModel,
              base_report: EvalReport | None, report: EvalReport, decision: GateDecision,
              promotion: PromotionResult, variants: list[QuantizedModel], variant_reports: list[EvalReport],
              variant_promotions: dict[str, PromotionResult], warnings: list[str],
              stage: StageRun) -> RunSummary:
    flow = stage.flow
    summary = summary_of(name, data, base_model, trained, base_report, report, decision, promotion, flow,
                         variants, variant_reports, variant_promotions, warnings)
    c, rid = stage.client, flow.parent_run_id
    c.log_text(rid, summary.markdown(), "summary.md")
    c.log_dict(rid, summary.model_dump(mode="json"), "summary.json")
    for row in summary.scores:
        c.log_metric(rid, metric_key(row.task, row.metric), row.finetuned)
        if row.base is not None:
            c.log_metric(rid, metric_key(row.task, row.metric) + ".base", row.base)
    c.log_metric(rid, "gate_passed", float(summary.gate_passed))
    for v in summary.variants:
        c.log_metric(rid, mlflow_name("variant", v.variant, "size_ratio"), v.size_ratio)
        for key, value in v.scores.items():
            c.log_metric(rid, mlflow_name("variant", v.variant, key.replace(",", "/")), value)
    # Cached stages ran in an earlier flow run: link the MLflow runs that produced their outputs.
    for stage_name, stage_run_id in summary.stage_runs.items():
        if stage_run_id:
            c.set_tag(rid, f"gauntlet.stage_run.{stage_name}", stage_run_id)
    create_markdown_artifact(summary.markdown(), key="run-summary", description=f"Gauntlet run {name}")
    return summary
