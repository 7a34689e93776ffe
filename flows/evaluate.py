"""The evaluate flow: one model (a local folder or a hub model), one suite, one report.

Composition only: the model fetch and the evaluation stage are the same cached tasks the finetune
flow uses (``tasks/models.py``, ``tasks/evaluate.py``); ``gauntlet eval`` runs this flow.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from tasks.evaluate import evaluate_stage
from tasks.models import fetch_model_stage
from tasks.refs import EvalReport
from tasks.spec import EvalSpec, ModelSpec
from tasks.state import sha256_json
from tasks.tracking import flatten_params, parent_run, tracking_uri


@flow(name="evaluate", log_prints=True)
def evaluate_flow(model: ModelSpec, spec: EvalSpec, variant: str = "base",
                  experiment: str = "gauntlet-eval") -> EvalReport:
    """Evaluate one model with one evaluation config.

    model: where the model comes from (a local folder, hf://org/name@revision, …).
    spec: the evaluation (suite and/or tasks, fixtures or real data, backend, protocol settings).
    variant: the report's variant label (base, finetuned, gptq-int4, …).
    experiment: the MLflow experiment of the run.
    """
    tags = {"prefect.flow_run_id": str(flow_run.id), "gauntlet.config_hash": sha256_json(spec.model_dump(mode="json")),
            "gauntlet.flow": "evaluate"}
    params = {**flatten_params("model", model.model_dump(mode="json")), "variant": variant}
    with parent_run(tracking_uri(), experiment, f"eval-{flow_run.name}", tags, params) as run:
        ref = fetch_model_stage(model, run)
        return evaluate_stage(spec, ref, None, variant, run)
