"""The MLflow Model Registry as Gauntlet uses it: candidates, aliases, a lock, and a champion history.

- A run registers its model as a *candidate* version (from the durable artifact, with lineage tags, its
  scores and a model card) and points the ``challenger`` alias at it while the gate judges it.
- ``champion`` moves only under :func:`registry_lock`, MLflow having no compare-and-set on aliases.
  Whoever holds the lock re-reads the champion, so a promotion always acts on the champion it compared with.
- Every move of ``champion`` (gated promotion, manual promotion, rollback) is appended, under the same lock,
  to the registered model's tags as ``gauntlet.champion.<seq>`` (JSON): the history ``gauntlet history``
  prints and ``gauntlet rollback`` replays.

The functions take an ``MlflowClient``; the stages (``tasks/register.py``, ``tasks/gate.py``) and the CLI
(``gauntlet promote|rollback|history``) call them. Registering candidates is in :mod:`.candidates`, the
lock in :mod:`.lock`, promotion (compare-and-set, by hand, rollback) in :mod:`.promotion`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel

from gauntlet.config.gate import RegistrySpec
from gauntlet.refs import GateDecision
from gauntlet.registry.lock import Lease, RegistryError

SCORE_TAG = "score."
PERF_TAG = "perf."
EVENT_TAG = "gauntlet.champion."          # registered-model tag prefix of the champion history


class UnknownModelError(RegistryError):
    """The registered model or version does not exist (invalid input, exit 2)."""


class ChampionEvent(BaseModel):
    """One move of the champion alias, as recorded in the registered model's tags."""

    seq: int
    action: Literal["promote", "manual-promote", "rollback"]
    version: str
    previous: str | None = None             # the champion it replaced
    at: str                                 # ISO 8601, UTC
    by: str                                 # user@host, or the pipeline's flow run
    reason: str
    compared_to: str | None = None          # the champion the gate compared against (gated promotions)
    mlflow_run_id: str | None = None
    prefect_flow_run_id: str | None = None


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def scores_of(tags: dict[str, str]) -> dict[str, float]:
    return {k[len(SCORE_TAG):]: float(v) for k, v in tags.items() if k.startswith(SCORE_TAG)}


def champion_of(c, registry: RegistrySpec) -> tuple[str | None, dict[str, float]]:
    """The current champion's version and its recorded scores, or (None, {})."""
    from mlflow.exceptions import MlflowException

    try:
        mv = c.get_model_version_by_alias(registry.model_name, registry.champion_alias)
    except MlflowException:
        return None, {}
    return str(mv.version), scores_of(mv.tags)


def version_with_sha(c, registry: RegistrySpec, sha: str) -> str | None:
    """The registered version holding exactly these model files, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = c.search_model_versions(f"name='{registry.model_name}'")
    except MlflowException:
        return None
    matches = [str(v.version) for v in versions if v.tags.get("model.sha") == sha]
    return min(matches, key=int) if matches else None


def get_version(c, model_name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        c.get_registered_model(model_name)
    except MlflowException as e:
        if _not_found(e):
            raise UnknownModelError(f"no registered model named {model_name!r}") from None
        raise
    try:
        return c.get_model_version(model_name, str(version))
    except MlflowException as e:
        if _not_found(e):
            raise UnknownModelError(f"{model_name!r} has no version {version!r}") from None
        raise


def history(c, model_name: str) -> list[ChampionEvent]:
    """Every recorded move of the champion alias, oldest first."""
    from mlflow.exceptions import MlflowException

    try:
        tags = c.get_registered_model(model_name).tags
    except MlflowException as e:
        if _not_found(e):
            raise UnknownModelError(f"no registered model named {model_name!r}") from None
        raise
    events = [ChampionEvent.model_validate_json(v) for k, v in tags.items() if k.startswith(EVENT_TAG)]
    return sorted(events, key=lambda e: e.seq)


def champion_stack(events: list[ChampionEvent]) -> list[str]:
    """Replay the history: a promotion pushes its version, a rollback pops. The top is the champion,
    the one below it is where a rollback goes."""
    stack: list[str] = []
    for e in events:
        if e.action == "rollback":
            if stack:
                stack.pop()
            if not stack or stack[-1] != e.version:
                stack.append(e.version)
        else:
            stack.append(e.version)
    return stack


def history_table(events: list[ChampionEvent]) -> str:
    """The history as a markdown table (what ``gauntlet history`` prints)."""
    lines = ["| # | when (UTC) | action | champion | replaced | by | reason |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {e.seq} | {e.at} | {e.action} | v{e.version} | {'v' + e.previous if e.previous else '—'} "
              f"| {e.by} | {e.reason} |" for e in events]
    return "\n".join(lines) if events else "(no champion moves recorded)"


def record_verdict(c, registry: RegistrySpec, version: str, decision: GateDecision) -> None:
    name = registry.model_name
    tags = {"gate.verdict": "passed" if decision.passed else "failed", "gate.compared_to": str(decision.compared_to),
            "gate.reasons": f"{now()}: " + ("; ".join(decision.reasons)[:4800] or "all rules passed")}
    for k, v in tags.items():
        c.set_model_version_tag(name, version, k, v)


def clear_challenger(c, registry: RegistrySpec, version: str) -> None:
    """The version is no longer under evaluation: drop ``challenger`` if it still points at it."""
    from mlflow.exceptions import MlflowException

    try:
        mv = c.get_model_version_by_alias(registry.model_name, registry.challenger_alias)
    except MlflowException:
        return
    if str(mv.version) == str(version):
        c.delete_registered_model_alias(registry.model_name, registry.challenger_alias)


def set_champion(c, registry: RegistrySpec, version: str, previous: str | None, action: str, by: str,
                 reason: str, lease: Lease, **extra: str | None) -> ChampionEvent:
    """Move ``champion`` to ``version`` and append the move to the history. The caller holds the lock and
    read ``previous`` under it."""
    name = registry.model_name
    events = history(c, name)
    event = ChampionEvent(seq=(events[-1].seq + 1) if events else 1, action=action, version=str(version),
                          previous=previous, at=now(), by=by, reason=reason, **extra)
    lease.verify()
    c.set_registered_model_alias(name, registry.champion_alias, str(version))
    c.set_registered_model_tag(name, f"{EVENT_TAG}{event.seq:06d}", event.model_dump_json(exclude_none=True))
    clear_challenger(c, registry, str(version))
    return event
