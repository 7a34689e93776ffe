"""The MLflow Model Registry as Gauntlet uses it: candidates, aliases, a lock, and a champion history.

- A run registers its model as a *candidate* version (from the durable artifact, with lineage tags, its
  scores and a model card) and points the ``challenger`` alias at it while the gate judges it.
- ``champion`` moves only under :func:`registry_lock`, MLflow having no compare-and-set on aliases.
  Whoever holds the lock re-reads the champion, so a promotion always acts on the champion it compared with.
- Every move of ``champion`` (gated promotion, manual promotion, rollback) is appended, under the same lock,
  to the registered model's tags as ``gauntlet.champion.<seq>`` (JSON): the history ``gauntlet history``
  prints and ``gauntlet rollback`` replays.

The plain functions take an ``MlflowClient``; the CLI (``gauntlet promote|rollback|history``) and the
tasks in ``tasks/gate.py`` call them.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import random
import socket
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal
from urllib.parse import unquote, urlparse

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.evaluate import metric_key
from tasks.refs import DatasetRef, EvalReport, GateDecision, ModelRef, QuantizedModel, RegisteredVersion, TrainedModel
from tasks.spec import RegistrySpec
from tasks.tracking import RunContext, git_commit, stage_run

log = logging.getLogger(__name__)

SCORE_TAG = "score."
PERF_TAG = "perf."
EVENT_TAG = "gauntlet.champion."          # registered-model tag prefix of the champion history
LOCK_MODEL_PREFIX = "gauntlet-lock--"      # registered models used as locks on a shared MLflow server
LOCK_ENV = "GAUNTLET_REGISTRY_LOCK"        # "file" | "registry": override the choice made from the URI
LEASE_S = 120.0                            # a registry lock older than this is stale (its holder died)


class RegistryError(Exception):
    """A registry operation that cannot be done as asked (exit 1): nothing to roll back, lock timeout…"""


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


def actor() -> str:
    """Who is acting, for the record: user@host."""
    try:
        user = getpass.getuser()
    except Exception:  # no login name in some containers
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _not_found(e: Exception) -> bool:
    return getattr(e, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


# ---------------------------------------------------------------------------------------------
# the lock: compare-and-set for aliases
# ---------------------------------------------------------------------------------------------


def lock_mode(tracking_uri: str) -> Literal["file", "registry"]:
    """``file`` where the store is a local file (sqlite, file store): an OS lock next to it, released by the
    OS if the holder dies. ``registry`` otherwise (MLflow server, remote database): a lock row in the
    registry itself, so that machines sharing the server exclude each other."""
    forced = os.environ.get(LOCK_ENV, "").strip()
    if forced in ("file", "registry"):
        return forced  # type: ignore[return-value]
    scheme = urlparse(tracking_uri).scheme
    return "file" if scheme in ("sqlite", "file", "") or len(scheme) == 1 else "registry"  # len 1: C:\\ paths


def lock_file_for(tracking_uri: str, model_name: str) -> Path:
    """The lock file of one registered model: next to the store, so every process using it finds it."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        store = Path(unquote(parsed.path[1:])).resolve()   # sqlite:///rel.db, sqlite:////abs/path.db
        folder = store.with_name(store.name + ".locks")
    else:
        store = Path(unquote(parsed.path) if parsed.scheme == "file" else tracking_uri)
        folder = store / ".gauntlet-locks"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model_name)[:60]
    digest = hashlib.sha256(model_name.encode()).hexdigest()[:12]
    return folder / f"registry-{safe}-{digest}.lock"


class Lease:
    """A held registry lock. :meth:`verify` right before moving an alias: a holder whose registry lease
    expired (and so may have been broken by another process) must not act on what it read."""

    def __init__(self, c, lock_name: str | None, token: str, expires_at: float):
        self.c, self.lock_name, self.token, self.expires_at = c, lock_name, token, expires_at

    def verify(self) -> None:
        if self.lock_name is None:   # an OS file lock cannot be taken away from a live holder
            return
        from mlflow.exceptions import MlflowException

        try:
            tags = self.c.get_registered_model(self.lock_name).tags
        except MlflowException:
            tags = {}
        if tags.get("token") != self.token or time.time() >= self.expires_at:
            raise RegistryError(f"lost the registry lock {self.lock_name!r} (its lease ran out); nothing was "
                                "changed, run the promotion again")


@contextmanager
def registry_lock(c, model_name: str, timeout_s: float = 300.0) -> Iterator[Lease]:
    """Mutual exclusion for everything that reads and then moves ``model_name``'s aliases or history."""
    mode = lock_mode(c.tracking_uri)
    if mode == "file":
        from filelock import FileLock, Timeout

        path = lock_file_for(c.tracking_uri, model_name)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise RegistryError(f"timed out after {timeout_s:.0f}s waiting for the registry lock {path}") from None
        try:
            yield Lease(c, None, "", float("inf"))
        finally:
            lock.release()
        return
    lease = _acquire_registry_lock(c, model_name, timeout_s)
    try:
        yield lease
    finally:
        _release_registry_lock(lease)


def _acquire_registry_lock(c, model_name: str, timeout_s: float) -> Lease:
    """Create the registered model ``gauntlet-lock--<name>``: the store's unique-name constraint makes
    creation an atomic test-and-set, on a sqlite file, a database or an MLflow server alike."""
    from mlflow.exceptions import MlflowException

    lock_name = LOCK_MODEL_PREFIX + model_name
    token = uuid.uuid4().hex
    deadline = time.monotonic() + timeout_s
    while True:
        expires_at = time.time() + LEASE_S
        try:
            c.create_registered_model(lock_name, tags={"token": token, "owner": actor(), "expires_at": str(expires_at)},
                                      description=f"lock on {model_name!r} held by {actor()} (Gauntlet); "
                                                  f"stale after {LEASE_S:.0f}s")
            return Lease(c, lock_name, token, expires_at)
        except MlflowException as e:
            # "does not exist": the store saw the name taken, then it was released before it could say by whom
            if getattr(e, "error_code", "") not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        _break_if_stale(c, lock_name)
        if time.monotonic() > deadline:
            raise RegistryError(f"timed out after {timeout_s:.0f}s waiting for the registry lock {lock_name!r}")
        time.sleep(random.uniform(0.02, 0.15))


def _break_if_stale(c, lock_name: str) -> None:
    """Remove a lock whose holder died. Renaming is atomic (one breaker wins); a live holder whose lock was
    taken this way finds out in :meth:`Lease.verify` and changes nothing."""
    from mlflow.exceptions import MlflowException

    try:
        tags = c.get_registered_model(lock_name).tags
    except MlflowException:
        return
    if float(tags.get("expires_at", "inf")) > time.time():
        return
    broken = f"{lock_name}--stale-{uuid.uuid4().hex[:8]}"
    try:
        c.rename_registered_model(lock_name, broken)
        c.delete_registered_model(broken)
        log.warning("broke the stale registry lock %s (held by %s)", lock_name, tags.get("owner"))
    except MlflowException:
        pass  # another waiter broke it first


def _release_registry_lock(lease: Lease) -> None:
    from mlflow.exceptions import MlflowException

    try:
        if lease.c.get_registered_model(lease.lock_name).tags.get("token") == lease.token:
            lease.c.delete_registered_model(lease.lock_name)
    except MlflowException:
        pass  # already broken as stale: nothing of ours to release


# ---------------------------------------------------------------------------------------------
# reading the registry
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# registering a candidate
# ---------------------------------------------------------------------------------------------


def model_card(model_name: str, lineage: dict[str, str], report: EvalReport) -> str:
    """README.md for the registered folder: what this model is made of and how it scored."""
    rows = [f"| {s.task} | {s.metric} | {s.value:.4f} | {'—' if s.stderr is None else f'{s.stderr:.4f}'} |"
            for s in report.scores]
    perf = ([f"- {k}: {v}" for k, v in report.perf.model_dump().items()] if report.perf
            else ["- not measured"])
    return "\n".join([
        f"# {model_name}", "",
        "Fine-tuned and evaluated by Gauntlet. The gate verdict and the champion history are in the registry "
        "(tags `gate.verdict`, `gate.compared_to`; `gauntlet history " + model_name + "`).", "",
        "## Lineage", "",
        f"- base model: `{lineage.get('base_model.source')}` revision `{lineage.get('base_model.revision')}` "
        f"(content sha256 `{lineage.get('base_model.sha')}`)",
        f"- data version (DVC md5): `{lineage.get('data.md5')}`",
        f"- config hash: `{lineage.get('config_hash')}`",
        f"- git commit: `{lineage.get('git_commit')}`",
        f"- Prefect flow run: `{lineage.get('prefect.flow_run_id')}`; MLflow run: `{lineage.get('mlflow.parent_run_id')}`",
        f"- model files sha256: `{lineage.get('model.sha')}`",
        *([f"- quantized: {lineage['quantization.variant']} ({lineage['quantization.method']}, "
           f"{lineage['quantization.bits']} bits, group size {lineage['quantization.group_size']}) from "
           f"`{lineage['quantization.from_sha']}`, calibration md5 `{lineage['quantization.calibration_md5']}`, "
           f"{lineage['quantization.size_ratio']}x the size"] if "quantization.variant" in lineage else []), "",
        "## Scores", "", "| task | metric | value | stderr |", "|---|---|---|---|", *rows, "",
        "## Speed", "", *perf, "",
        "## Evaluation protocol", "", "```json", json.dumps(report.protocol, indent=2, sort_keys=True, default=str),
        "```", "",
        "## Loading", "", "```python",
        "from mlflow.artifacts import download_artifacts",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f'path = download_artifacts("models:/{model_name}@champion")   # or models:/{model_name}/<version>',
        "model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)",
        "```", ""])


def candidate_tags(lineage: dict[str, str], report: EvalReport) -> dict[str, str]:
    tags = {**lineage, "gate.verdict": "pending"}
    # full precision; tag keys allow no commas (lm-eval's "exact_match,strict-match")
    tags.update({SCORE_TAG + metric_key(s.task, s.metric): repr(s.value) for s in report.scores})
    if report.perf:
        tags.update({f"{PERF_TAG}{k}": str(v) for k, v in report.perf.model_dump().items()})
    return tags


def register_candidate(c, registry: RegistrySpec, run_id: str, model_dir: Path, lineage: dict[str, str],
                       report: EvalReport) -> RegisteredVersion:
    """Register ``model_dir`` (uploaded as ``run_id``'s ``model`` artifact, with a model card) as a new
    version and point ``challenger`` at it; or find the version that already holds these exact files."""
    from mlflow.exceptions import MlflowException

    sha = lineage["model.sha"]
    name = registry.model_name

    def upload() -> str:
        c.log_artifacts(run_id, str(model_dir), "model")
        c.log_text(run_id, model_card(name, lineage, report), "model/README.md")
        return f"{c.get_run(run_id).info.artifact_uri}/model"

    # The upload is slow for big models: do it outside the lock; only find-or-create is inside it.
    source = upload() if version_with_sha(c, registry, sha) is None else None
    with registry_lock(c, name, registry.lock_timeout_s):
        try:
            c.create_registered_model(name, description="Registered by Gauntlet: candidates with their lineage; "
                                                        "`champion` is the promoted one.")
        except MlflowException:
            pass  # already exists
        version = version_with_sha(c, registry, sha)
        if version is None:
            source = source or upload()  # it was registered, then deleted by hand meanwhile
            mv = c.create_model_version(name, source=source, run_id=run_id, tags=candidate_tags(lineage, report),
                                        description=f"candidate from flow run {lineage.get('prefect.flow_run_id')}")
            version, created = str(mv.version), True
        else:
            created = False
            for k, v in candidate_tags(lineage, report).items():
                if k.startswith((SCORE_TAG, PERF_TAG)):  # a re-evaluation may differ (e.g. a new eval suite)
                    c.set_model_version_tag(name, version, k, v)
        champion, _ = champion_of(c, registry)
        if version != champion:
            c.set_registered_model_alias(name, registry.challenger_alias, version)
            if not created:
                c.set_model_version_tag(name, version, "gate.verdict", "pending")
        mv = c.get_model_version(name, version)
    return RegisteredVersion(model_name=name, version=version, source=mv.source, model_sha=sha, created=created,
                             mlflow_run_id=mv.run_id)


# ---------------------------------------------------------------------------------------------
# moving the champion (callers hold registry_lock)
# ---------------------------------------------------------------------------------------------


def record_verdict(c, registry: RegistrySpec, version: str, decision: GateDecision) -> None:
    name = registry.model_name
    tags = {"gate.verdict": "passed" if decision.passed else "failed", "gate.compared_to": str(decision.compared_to),
            "gate.reasons": f"{_now()}: " + ("; ".join(decision.reasons)[:4800] or "all rules passed")}
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
                          previous=previous, at=_now(), by=by, reason=reason, **extra)
    lease.verify()
    c.set_registered_model_alias(name, registry.champion_alias, str(version))
    c.set_registered_model_tag(name, f"{EVENT_TAG}{event.seq:06d}", event.model_dump_json(exclude_none=True))
    clear_challenger(c, registry, str(version))
    return event


def promote_manually(c, registry: RegistrySpec, version: str, reason: str, by: str | None = None) -> ChampionEvent | None:
    """``gauntlet promote``: a person moves the champion, gate or no gate; the reason is recorded.
    Returns None when the version already is the champion."""
    if not reason.strip():
        raise RegistryError("a promotion by hand needs a --reason: it is recorded in the history")
    mv = get_version(c, registry.model_name, version)
    with registry_lock(c, registry.model_name, registry.lock_timeout_s) as lease:
        current, _ = champion_of(c, registry)
        if current == str(mv.version):
            return None
        return set_champion(c, registry, str(mv.version), current, "manual-promote", by or actor(),
                            f"{reason} (gate verdict: {mv.tags.get('gate.verdict', 'none')})", lease)


def rollback(c, registry: RegistrySpec, reason: str = "", by: str | None = None) -> ChampionEvent:
    """``gauntlet rollback``: give ``champion`` back to the version that held it before the current one."""
    name = registry.model_name
    with registry_lock(c, name, registry.lock_timeout_s) as lease:
        stack = champion_stack(history(c, name))
        current, _ = champion_of(c, registry)
        if current is None:
            raise RegistryError(f"{name!r} has no champion: nothing to roll back")
        if not stack or stack[-1] != current:
            raise RegistryError(f"{name}@{registry.champion_alias} is v{current}, but the recorded history ends with "
                                f"v{stack[-1] if stack else '(nothing)'}: the alias was moved outside Gauntlet. "
                                f"Use `gauntlet promote {name} VERSION --reason …` to choose the champion")
        if len(stack) < 2:
            raise RegistryError(f"v{current} is the first recorded champion of {name!r}: there is no previous "
                                "champion to roll back to")
        target = stack[-2]
        event = set_champion(c, registry, target, current, "rollback", by or actor(),
                             reason or f"rolled back from v{current}", lease)
        c.set_model_version_tag(name, current, "champion.rolled_back_at", event.at)
        return event


# ---------------------------------------------------------------------------------------------
# the Prefect task
# ---------------------------------------------------------------------------------------------


def lineage_of(trained: TrainedModel, data: DatasetRef, config_hash: str, run: RunContext) -> dict[str, str]:
    lineage = {"base_model.source": trained.base.source, "base_model.sha": trained.base.sha,
               "base_model.revision": trained.base.revision or "unversioned (see base_model.sha)",
               "data.md5": data.md5, "config_hash": config_hash, "git_commit": git_commit(),
               "model.sha": trained.merged.sha, "model.path": trained.output_dir,
               "prefect.flow_run_id": str(run.flow_run_id), "mlflow.parent_run_id": run.parent_run_id}
    return {**lineage, **quantization_tags(trained.merged)}


def quantization_tags(model: ModelRef) -> dict[str, str]:
    """How a quantized variant was made (method, bits, group size, what it was quantized from and
    calibrated on); nothing for an unquantized model."""
    if not isinstance(model, QuantizedModel):
        return {}
    return {"quantization.variant": model.variant, "quantization.method": model.method,
            "quantization.bits": str(model.bits),
            "quantization.group_size": "none" if model.group_size is None else str(model.group_size),
            "quantization.from_sha": model.base_sha,
            "quantization.calibration_md5": model.calibration_md5 or "none (calibration-free)",
            "quantization.size_ratio": f"{model.size_ratio:.3f}"}


@task(name="register_challenger", cache_policy=NO_CACHE)
def register_challenger(registry: RegistrySpec, trained: TrainedModel, report: EvalReport, data: DatasetRef,
                        config_hash: str, run: RunContext) -> RegisteredVersion:
    """Register the evaluated model as a candidate version, ``challenger`` while the gate judges it."""
    logger = get_run_logger()
    with stage_run(run, "register", {"registry.model_name": registry.model_name}) as (c, rid):
        candidate = register_candidate(c, registry, rid, Path(trained.merged.path),
                                       lineage_of(trained, data, config_hash, run), report)
        c.set_tag(rid, "registry.version", candidate.version)
    logger.info(f"{'registered' if candidate.created else 'found already registered'} "
                f"{registry.model_name} v{candidate.version} (source {candidate.source})")
    return candidate
