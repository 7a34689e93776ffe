"""Stage ``evaluate``: one model's report on one protocol, from its cached tasks and speed probe.

Key: the model's content hash, the whole protocol (every task's settings and content), the run's eval
data md5 and the variant label. Each task (``tasks/score.py``) and the probe (``tasks/speed_probe.py``)
is a stage of its own, committed to the cache as soon as it is done, so a later failure keeps them; the
model is loaded once, and only if one of them has to run.
"""

from __future__ import annotations

import re

from mlflow.entities import Param
from prefect.artifacts import create_markdown_artifact
from prefect.transactions import CommitMode, transaction

from gauntlet.config.eval import EvalSpec
from gauntlet.eval.engine import engine_for
from gauntlet.eval.protocol import plans_of, protocol_of
from gauntlet.eval.report import build_report, report_markdown
from gauntlet.names import task_result_metrics
from gauntlet.refs import DatasetRef, EvalReport, ModelRef, TaskResult
from gauntlet.tasks._stage import StageRun, stage
from gauntlet.tasks.perplexity import heldout_file, perplexity
from gauntlet.tasks.score import eval_data_md5, score
from gauntlet.tasks.speed_probe import speed_probe
from gauntlet.tracking import flatten_params


def _named_as_asked(report: EvalReport, model: ModelRef, **_) -> EvalReport:
    """The cache is keyed on the model's content, not its name, so a hit may be a report of the same files
    under another name (a registry version of a model evaluated in its training run): the report returned
    names the model it was asked about."""
    return report if report.model == model.name else report.model_copy(update={"model": model.name})


def run_data_md5s(spec: EvalSpec, data: DatasetRef | None) -> list[str | None]:
    """The md5s of the run's files the evaluation reads: the eval file, and the held-out file when
    ``eval.perplexity`` is on."""
    return [eval_data_md5(data)] + ([heldout_file(spec, data)[1]] if spec.perplexity else [])


@stage("evaluate", key=lambda spec, model, data, variant: [model.sha, protocol_of(spec), *run_data_md5s(spec, data),
                                                           variant],
       outputs=lambda report, _: [report.report_path], after=_named_as_asked,
       params=lambda model, variant, **_: {"model.sha": model.sha, "variant": variant},
       run_name="evaluate-{variant}")
def evaluate(spec: EvalSpec, model: ModelRef, data: DatasetRef | None, variant: str, stage: StageRun) -> EvalReport:
    plans = plans_of(spec)  # a task that no longer resolves fails this run, naming the task
    protocol = [Param(k, v[:6000]) for k, v in flatten_params("eval", protocol_of(spec)).items()]
    for i in range(0, len(protocol), 100):  # MLflow takes at most 100 params per batch
        stage.client.log_batch(stage.run_id, params=protocol[i:i + 100])
    nested = stage.nested()
    results: list[TaskResult] = []
    # One engine for the stage: loaded on first use only, i.e. only if some task or the probe runs.
    with engine_for(spec, model) as engine:
        for plan in plans:
            # Each task's result is committed to the cache when it is done: a later task's failure
            # must not roll it back (Prefect otherwise commits nested tasks with their parent).
            with transaction(commit_mode=CommitMode.EAGER):
                result = score(spec=spec, plan=plan, model=model, data=data, variant=variant, run=nested)
            stage.metrics(task_result_metrics(result))  # as they come: a later failure leaves these in the run
            results.append(result)
        with transaction(commit_mode=CommitMode.EAGER):
            perf = (speed_probe(spec=spec, model=model, variant=variant, run=nested)
                    if spec.speed_probe.enabled else None)
        with transaction(commit_mode=CommitMode.EAGER):
            ppl = (perplexity(spec=spec, model=model, data=data, variant=variant, run=nested)
                   if spec.perplexity else None)
        loads = engine.loads
    report = build_report(spec, model, variant, results, perf, stage.out, perplexity=ppl)
    if report.average_normalized is not None:
        stage.metric("average_normalized", report.average_normalized)
    if perf:
        stage.metrics(perf.model_dump(), prefix="perf.")
    if ppl:
        stage.metric("perplexity.byte_perplexity", ppl.byte_perplexity)
    stage.metric("engine_loads", loads)
    stage.artifacts(report.report_path)
    markdown = report_markdown(report)
    stage.text(markdown, "report.md")
    create_markdown_artifact(markdown, key="evaluation-" + re.sub(r"[^a-z0-9-]+", "-", variant.lower()),
                             description=f"evaluation of {model.name} ({variant})")
    stage.log.info(f"{variant}: " + ", ".join(f"{r.task}.{r.metric}={r.value:.4f}" for r in results)
                   + (f"; average normalized {report.average_normalized:.1f}" if report.average_normalized is not None
                      else "") + f"; model loaded {loads}x")
    return report
