"""The evaluate flow: one model (a local folder, a hub or registry model), one suite, one report.

Composition only: the same resolve → fetch → evaluate stages as the finetune flow; ``gauntlet eval`` runs it.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from gauntlet.config.eval import EvalSpec
from gauntlet.config.model import ModelSpec
from gauntlet.hashing import sha256_json
from gauntlet.refs import EvalReport
from gauntlet.tasks._flow import flow_parent_run
from gauntlet.tasks.evaluate import evaluate
from gauntlet.tasks.leaderboard import eval_data
from gauntlet.tasks.models import fetch_model, resolve_model
from gauntlet.tracking import flatten_params, tracking_uri


@flow(name="evaluate", log_prints=True)
def evaluate_flow(model: ModelSpec, spec: EvalSpec, variant: str = "base", experiment: str = "gauntlet-eval",
                  eval_file: str | None = None) -> EvalReport:
    """Evaluate one model with one evaluation config.

    model: where the model comes from (a local folder, hf://org/name@revision, models:/NAME@alias, …).
    spec: the evaluation (suite and/or tasks, fixtures or real data, backend, protocol settings).
    variant: the report's variant label (base, finetuned, gptq-int4, …).
    experiment: the MLflow experiment of the run.
    eval_file: a JSONL file of evaluation items for the tasks that read the run's eval data (demo_facts, …);
        None: each task reads its own.
    """
    tags = {"gauntlet.config_hash": sha256_json(spec.model_dump(mode="json")),
            "gauntlet.flow": "evaluate"}
    params = {**flatten_params("model", model.model_dump(mode="json")), "variant": variant}
    with flow_parent_run(tracking_uri(), experiment, f"eval-{flow_run.name}", tags, params) as run:
        ref = fetch_model(resolved=resolve_model(spec=model, run=run), run=run)
        data = eval_data(path=eval_file, run=run) if eval_file is not None else None
        return evaluate(spec=spec, model=ref, data=data, variant=variant, run=run)
