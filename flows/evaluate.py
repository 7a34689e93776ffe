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
from gauntlet.tracking import flatten_params, parent_run, tracking_uri
from gauntlet.tasks.evaluate import evaluate
from gauntlet.tasks.models import fetch_model, resolve_model


@flow(name="evaluate", log_prints=True)
def evaluate_flow(model: ModelSpec, spec: EvalSpec, variant: str = "base",
                  experiment: str = "gauntlet-eval") -> EvalReport:
    """Evaluate one model with one evaluation config.

    model: where the model comes from (a local folder, hf://org/name@revision, models:/NAME@alias, …).
    spec: the evaluation (suite and/or tasks, fixtures or real data, backend, protocol settings).
    variant: the report's variant label (base, finetuned, gptq-int4, …).
    experiment: the MLflow experiment of the run.
    """
    tags = {"prefect.flow_run_id": str(flow_run.id), "gauntlet.config_hash": sha256_json(spec.model_dump(mode="json")),
            "gauntlet.flow": "evaluate"}
    params = {**flatten_params("model", model.model_dump(mode="json")), "variant": variant}
    with parent_run(tracking_uri(), experiment, f"eval-{flow_run.name}", tags, params) as run:
        ref = fetch_model(resolved=resolve_model(spec=model, run=run), run=run)
        return evaluate(spec=spec, model=ref, data=None, variant=variant, run=run)
