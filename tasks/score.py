"""Stage ``score``: one task of an evaluation suite on one model, through lm-evaluation-harness.

Key: the model's content hash, the engine protocol (backend, device, dtype, decoding, seeds, batch), the
task's settings and content hash, and the run's eval data md5 when the task reads it. Not the variant
label: the same files score the same under any name. Each task is its own cache entry, so adding a task
to a suite runs that task alone.
"""

from __future__ import annotations

from gauntlet.config.eval import EvalSpec
from gauntlet.eval.engine import engine_for
from gauntlet.eval.protocol import engine_protocol, task_protocol
from gauntlet.eval.scoring import run_task
from gauntlet.eval.suites import EvalTaskPlan
from gauntlet.names import task_result_metrics
from gauntlet.refs import DatasetRef, ModelRef, TaskResult
from gauntlet.tasks._stage import StageRun, stage
from gauntlet.tracking import flatten_params


def eval_data_md5(data: DatasetRef | None) -> str | None:
    """The md5 of the run's eval file: what a task that reads the run's eval data depends on."""
    return data.eval_md5 if data is not None else None


@stage("score", key=lambda spec, plan, model, data, variant: [
           model.sha, engine_protocol(spec), task_protocol(plan),
           eval_data_md5(data) if plan.uses_run_eval_data else None],
       outputs=lambda result, _: [result.results_path, result.samples_path],
       params=lambda spec, plan, model, **_: {**flatten_params("task", task_protocol(plan)),
                                              **flatten_params("eval", engine_protocol(spec)), "model.sha": model.sha},
       run_name="score-{variant}-{plan.name}")
def score(spec: EvalSpec, plan: EvalTaskPlan, model: ModelRef, data: DatasetRef | None, variant: str,
          stage: StageRun) -> TaskResult:
    with engine_for(spec, model) as engine:
        result = run_task(spec, plan, engine, data.eval_path if data else None, stage.out)
    stage.metrics(task_result_metrics(result))
    stage.artifacts(result.results_path, result.samples_path)
    stage.log.info(f"{variant} {plan.name}: {plan.metric}={result.value:.4f} "
                   f"(normalized {result.normalized:.1f}) in {result.seconds:.1f}s")
    return result
