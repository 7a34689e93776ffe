"""The evaluate flow: one model (a local folder, a hub or registry model), one suite, one report.

Composition only: the same resolve → fetch → evaluate stages as the finetune flow, then the judge and the safety
rates where the config asks for them; ``gauntlet eval`` runs it.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from gauntlet.config.eval import EvalSpec
from gauntlet.config.model import ModelSpec
from gauntlet.hashing import sha256_json
from gauntlet.refs import EvalReport, ModelRef
from gauntlet.tasks._flow import flow_parent_run
from gauntlet.tasks.evaluate import evaluate
from gauntlet.tasks.judge import judge_candidate
from gauntlet.tasks.leaderboard import eval_data
from gauntlet.tasks.models import fetch_model, resolve_model
from gauntlet.tasks.safety import check_safety
from gauntlet.tracking import RunContext, flatten_params, tracking_uri


def with_judges(spec: EvalSpec, candidate: ModelRef, opponent: ModelSpec | None, report: EvalReport,
                run: RunContext) -> EvalReport:
    """``report`` with the judges the config asks for, as the finetune flow adds them: the win rate against
    ``opponent`` (eval.judge), the harmful and over-refusal rates (eval.safety)."""
    if spec.judge is not None:
        if opponent is None:
            raise ValueError("eval.judge is set but no opponent is named: the win rate needs a model to judge the "
                             "answers against (gauntlet eval --opponent SOURCE), or remove eval.judge")
        against = fetch_model(resolved=resolve_model(spec=opponent, run=run), run=run)
        report = judge_candidate(spec=spec.judge, registry=None, candidate=candidate, base=against, report=report,
                                 run=run)
    if spec.safety is not None:
        report = check_safety(spec=spec.safety, judge=spec.judge, candidate=candidate, report=report, run=run)
    return report


@flow(name="evaluate", log_prints=True)
def evaluate_flow(model: ModelSpec, spec: EvalSpec, variant: str = "base", experiment: str = "gauntlet-eval",
                  eval_file: str | None = None, opponent: ModelSpec | None = None) -> EvalReport:
    """Evaluate one model with one evaluation config.

    model: where the model comes from (a local folder, hf://org/name@revision, models:/NAME@alias, …).
    spec: the evaluation (suite and/or tasks, fixtures or real data, backend, protocol settings).
    variant: the report's variant label (base, finetuned, gptq-int4, …).
    experiment: the MLflow experiment of the run.
    eval_file: a JSONL file of evaluation items for the tasks that read the run's eval data (demo_facts, …);
        None: each task reads its own.
    opponent: with eval.judge, the model whose answers the candidate's are judged against (its win rate).
    """
    tags = {"gauntlet.config_hash": sha256_json(spec.model_dump(mode="json")),
            "gauntlet.flow": "evaluate"}
    params = {**flatten_params("model", model.model_dump(mode="json")), "variant": variant}
    with flow_parent_run(tracking_uri(), experiment, f"eval-{flow_run.name}", tags, params) as run:
        ref = fetch_model(resolved=resolve_model(spec=model, run=run), run=run)
        data = eval_data(path=eval_file, run=run) if eval_file is not None else None
        report = evaluate(spec=spec, model=ref, data=data, variant=variant, run=run)
        return with_judges(spec, ref, opponent, report, run)
