"""Stage ``train``: preflight, then the training program under ``accelerate launch`` (gauntlet.training).

Key: the ``train`` section (so the objective, ``beta`` and every ``train.preference`` setting), the base model's
content hash and the data version (the md5 of the preference pairs, for a preference objective); the code version
covers both training programs (this stage imports them). Retried (and resumed from the newest checkpoint, in
the same MLflow run) unless the config cannot train at all (``TrainingConfigError``).

A preference objective whose ``train.preference.reference`` names a model source (not ``base``) fetches it here,
through the model stages, nested under this one; the key holds that source as written, so pin it
(``models:/NAME/VERSION``, ``hf://org/name@revision``). The held-out preference accuracy of the base and of the
trained model, with their intervals and the paired difference, are this stage's metrics.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gauntlet.checkpoints import CheckpointUploader, restore_latest
from gauntlet.config.train import TrainSpec
from gauntlet.refs import DatasetRef, ModelRef, TrainedModel
from gauntlet.secrets import redact_uri
from gauntlet.tasks._stage import StageRun, stage
from gauntlet.tracking import flatten_params
from gauntlet.training import TrainingConfigError, train_model


@contextmanager
def checkpoints_in_store(stage: StageRun) -> Iterator[None]:
    """With a shared store: the newest checkpoint any attempt of this key uploaded (on any host) is brought here
    first, and every checkpoint this training writes is uploaded as it is written."""
    if not stage.shared:
        yield
        return
    experiments = [e.experiment_id for e in stage.client.search_experiments()]
    restore_latest(stage.client, experiments, stage.key, stage.out, echo=stage.log.info)
    with CheckpointUploader(stage.client, stage.run_id, stage.out, echo=stage.log.info):
        yield


def reference_model(spec: TrainSpec, stage: StageRun) -> ModelRef | None:
    """A preference objective's reference model when ``train.preference.reference`` names a source; None: the base
    (under LoRA/QLoRA the base with the adapter disabled)."""
    from gauntlet.config.model import ModelSpec
    from gauntlet.tasks.models import fetch_model, resolve_model

    source = spec.preference_settings().reference if spec.is_preference else "base"
    if source == "base":
        return None
    run = stage.nested()
    return fetch_model(resolved=resolve_model(spec=ModelSpec(source=source), run=run), run=run)


@stage("train", key=lambda spec, model, data: [spec, model.sha, data.md5],
       outputs=lambda trained, st: [trained.merged.path, st.out / "result.json"],
       params=lambda spec, model, data: {**flatten_params("train", spec.model_dump(mode="json")),
                                         "base_model_sha": model.sha, "data_md5": data.md5},
       retries=2, retry_delay_seconds=10, permanent=(TrainingConfigError,), resumable=True)
def train(spec: TrainSpec, model: ModelRef, data: DatasetRef, stage: StageRun) -> TrainedModel:
    out = stage.out
    reference = reference_model(spec, stage)
    with checkpoints_in_store(stage):
        result = train_model(spec, model, data, out, {"tracking_uri": redact_uri(stage.flow.tracking_uri),
                                                      "run_id": stage.run_id}, echo=stage.log.info,
                             reference=reference)
    for k, v in result.metrics.items():   # at the last step, so that the curves end there
        stage.metric(k, v, step=result.steps)
    resumed_from = json.loads((out / "result.json").read_text()).get("resumed_from_step", 0)
    if resumed_from:
        stage.tag("gauntlet.resumed_from_step", resumed_from)
    stage.artifacts(out / "loss_curve.png", out / "train_args.json", out / "result.json", out / "steps.jsonl")
    stage.artifacts(Path(result.merged.path) / "README.md", folder="model_card")
    stage.tag("gauntlet.merged_model", result.merged.path)
    stage.tag("gauntlet.objective", spec.objective)
    stage.log.info(f"trained {result.steps} steps: {result.metrics}; merged model {result.merged.path}")
    return result
