"""Stages ``resolve_model`` and ``fetch_model``: a model source made local, with its content hash.

``resolve_model`` is never cached: a registry alias can move, and a local folder can change, between
runs. ``fetch_model`` is keyed on the resolved source (and revision); an unpinned source (a local folder,
an object store, a hub branch) refreshes it, so changed weights never hide behind an unchanged name.
"""

from __future__ import annotations

from gauntlet.config.model import ModelSpec
from gauntlet.models import ModelFetchError, ResolvedModel, fetch_model as fetch, resolve_model as resolve
from gauntlet.refs import ModelRef
from gauntlet.tasks._stage import StageRun, stage


@stage("resolve_model", run_name="resolve-{spec.source}", mlflow=False)
def resolve_model(spec: ModelSpec, stage: StageRun) -> ResolvedModel:
    resolved = resolve(spec, stage.flow.tracking_uri)
    stage.log.info((resolved.note or f"{spec.source}: as given")
                   + ("" if resolved.stable else " (not pinned: fetched and hashed again)"))
    return resolved


def _named_as_configured(ref: ModelRef, resolved: ResolvedModel) -> ModelRef:
    """Reports and lineage name the source as configured (models:/NAME@alias), not the download folder, and
    carry a registry version's own lineage."""
    if resolved.source == ref.source:
        return ref
    return ref.model_copy(update={"source": resolved.source, "name": resolved.name or ref.name,
                                  "lineage": resolved.lineage})


@stage("fetch_model", key=lambda resolved: resolved.model, refresh=lambda resolved: not resolved.stable,
       after=_named_as_configured, outputs=lambda ref, _: [ref.path],
       params=lambda resolved: {"model.source": resolved.model.source, "model.revision": resolved.model.revision},
       retries=2, retry_delay_seconds=10, permanent=(ModelFetchError,))
def fetch_model(resolved: ResolvedModel, stage: StageRun) -> ModelRef:
    spec = resolved.model
    ref = fetch(spec)
    stage.tag("model.sha", ref.sha)
    stage.tag("model.path", ref.path)
    stage.log.info(f"model {spec.source} ready at {ref.path} (sha {ref.sha[:12]})")
    return ref
