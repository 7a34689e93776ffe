"""Stage ``register_challenger``: the evaluated model as a registry version, ``challenger`` while gated.

Never cached: it reads and writes the registry's current state (files already registered are found
again, not duplicated).
"""

from __future__ import annotations

from pathlib import Path

from gauntlet.config.gate import RegistrySpec
from gauntlet.refs import DatasetRef, EvalReport, RegisteredVersion, TrainedModel
from gauntlet.registry.candidates import lineage_of, register_candidate
from gauntlet.tasks._stage import StageRun, stage


@stage("register_challenger", run_name="register", params=lambda registry, **_: {
    "registry.model_name": registry.model_name})
def register_challenger(registry: RegistrySpec, trained: TrainedModel, report: EvalReport, data: DatasetRef,
                        config_hash: str, stage: StageRun) -> RegisteredVersion:
    candidate = register_candidate(stage.client, registry, stage.run_id, Path(trained.merged.path),
                                   lineage_of(trained, data, config_hash, stage.flow), report)
    stage.tag("registry.version", candidate.version)
    stage.log.info(f"{'registered' if candidate.created else 'found already registered'} "
                   f"{registry.model_name} v{candidate.version} (source {candidate.source})")
    return candidate

