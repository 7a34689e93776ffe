"""Stage ``train``: preflight, then the training program under ``accelerate launch`` (gauntlet.training).

Key: the ``train`` section, the base model's content hash and the data version; the code version covers
the training program too (this stage imports it). Retried (and resumed from the newest checkpoint, in
the same MLflow run) unless the config cannot train at all (``TrainingConfigError``).
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


@stage("train", key=lambda spec, model, data: [spec, model.sha, data.md5],
       outputs=lambda trained, st: [trained.merged.path, st.out / "result.json"],
       params=lambda spec, model, data: {**flatten_params("train", spec.model_dump(mode="json")),
                                         "base_model_sha": model.sha, "data_md5": data.md5},
       retries=2, retry_delay_seconds=10, permanent=(TrainingConfigError,), resumable=True)
def train(spec: TrainSpec, model: ModelRef, data: DatasetRef, stage: StageRun) -> TrainedModel:
    out = stage.out
    with checkpoints_in_store(stage):
        result = train_model(spec, model, data, out, {"tracking_uri": redact_uri(stage.flow.tracking_uri),
                                                      "run_id": stage.run_id}, echo=stage.log.info)
    for k, v in result.metrics.items():   # at the last step, so that the curves end there
        stage.metric(k, v, step=result.steps)
    resumed_from = json.loads((out / "result.json").read_text()).get("resumed_from_step", 0)
    if resumed_from:
        stage.tag("gauntlet.resumed_from_step", resumed_from)
    stage.artifacts(out / "loss_curve.png", out / "train_args.json", out / "result.json", out / "steps.jsonl")
    stage.artifacts(Path(result.merged.path) / "README.md", folder="model_card")
    stage.tag("gauntlet.merged_model", result.merged.path)
    stage.log.info(f"trained {result.steps} steps: {result.metrics}; merged model {result.merged.path}")
    return result
