"""Stage ``pull_data``: the run's DVC-tracked files, pulled (or reproduced), checked and hashed.

Key: the data section and the md5s that ``dvc.lock`` / ``.dvc`` files record for its files (the data
version), read without running DVC. `dvc pull` is tried again inside the library when the remote does not answer
or the repository is locked (never reproduced because of that); the stage is retried unless the data itself is
wrong (``DataError``).
"""

from __future__ import annotations

from gauntlet.config.data import DataSpec
from gauntlet.data.dvc import pull_data as pull, recorded_version
from gauntlet.data.jsonl import DataError
from gauntlet.refs import DatasetRef
from gauntlet.tasks._stage import StageRun, stage


@stage("pull_data", key=lambda spec: [spec, recorded_version(spec)],
       outputs=lambda ref, _: [p for p in (ref.train_path, ref.validation_path, ref.eval_path) if p],
       params=lambda spec: {"data.train": spec.train, "data.validation": spec.validation, "data.eval": spec.eval,
                            "data.repo": spec.repo},
       retries=2, retry_delay_seconds=5, permanent=(DataError,))
def pull_data(spec: DataSpec, stage: StageRun) -> DatasetRef:
    ref = pull(spec)
    stage.tag("data.md5", ref.md5)
    stage.metrics(ref.rows, prefix="rows.")
    stage.metric("duplicate_rate", ref.duplicate_rate)
    stage.json(ref, "dataset_ref.json")
    stage.log.info(f"data version {ref.md5[:12]}: rows {ref.rows}, duplicate rate {ref.duplicate_rate:.3f}")
    return ref
