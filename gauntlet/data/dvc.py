"""Versioned data with DVC: pull the DVC-tracked JSONL files of a run, check them, and hash them.

:func:`pull_data` runs ``dvc pull`` (DVC's Python API) for the spec's files, again with a growing delay when
the remote does not answer or DVC's lock is busy (``gauntlet.data.remote``); only a remote that answers and lacks
the data leads (reproducible specs) to ``dvc repro`` and ``dvc push``. Then it validates every file (JSON Lines,
required fields) and returns a DatasetRef whose hashes are the md5s DVC records: the data version.

No Prefect here: ``tasks/data.py`` is the stage. Two DVC quirks shape the code (dvc 3.x):

* DVC resolves relative paths (targets, and internally the run cache's stage paths) from the
  process's working directory, not from the repo; ``dvc repro`` fails with "is outside of DVC repo"
  when the cwd lies outside it. So every DVC call runs with the cwd switched to the repo root, under
  a process-wide lock (the cwd is process state), with absolute targets.
* DVC keeps per-repo state in a "site cache" (``/var/tmp/dvc`` by default). It is redirected to
  ``$GAUNTLET_HOME/dvc-site-cache`` with a config override (the ``DVC_SITE_CACHE_DIR`` environment
  variable still wins, as in DVC).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gauntlet.config.data import DataSpec
from gauntlet.data.jsonl import DataError, validate_files
from gauntlet.data.remote import PULL_ATTEMPTS, PULL_BACKOFF_S, DataUnavailable, network_cause, unreachable
from gauntlet.project import project_root
from gauntlet.refs import DatasetRef
from gauntlet.secrets import redact_uri
from gauntlet.state import gauntlet_home

if TYPE_CHECKING:
    from dvc.output import Output
    from dvc.repo import Repo
    from dvc.stage import Stage as DvcStage

logger = logging.getLogger(__name__)

# os.chdir is process-wide: one DVC operation at a time in this process.
_DVC_LOCK = threading.RLock()


@dataclass(frozen=True)
class _Target:
    role: str        # train | validation | eval
    rel: str         # path relative to the DVC repo root, as the spec gives it
    path: Path       # absolute


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def pull_data(spec: DataSpec, root: Path | None = None, attempts: int = PULL_ATTEMPTS,
              backoff_s: float = PULL_BACKOFF_S) -> DatasetRef:
    """Pull (or reproduce) the spec's files with DVC, validate them and return their DatasetRef.

    Raises :class:`DataError` when a file is not tracked by DVC, when the remote lacks the data and
    the spec is not reproducible, when reproduction fails, when a working file does not match the
    md5 recorded by DVC, and when a file is not valid JSON Lines with the required fields; raises
    :class:`DataUnavailable` when the remote did not answer (or the lock stayed busy) in ``attempts`` tries.
    """
    repo_root = (Path(root or project_root()) / spec.repo).resolve()
    if not (repo_root / ".dvc").is_dir():
        raise DataError(
            f"{str(repo_root)!r} is not a DVC repository (no .dvc/ folder). Fix: point data.repo at the "
            "folder holding .dvc/ and dvc.yaml, or run `dvc init` there."
        )
    targets = [_Target(role, rel, repo_root / rel) for role, rel in _roles(spec).items()]

    with _DVC_LOCK, contextlib.chdir(repo_root), _open_repo(repo_root) as repo:
        remote = _remote_description(repo, spec.remote)
        outs = {t.role: _find_out(repo, t) for t in targets}
        how = _pull_or_reproduce(repo, spec, targets, outs, remote, attempts, backoff_s)
        # DVC drops its index after each locked operation: look the outs up again for fresh md5s.
        file_md5 = {t.rel: _recorded_md5(repo, t) for t in targets}

    for t in targets:
        _verify_md5(t, file_md5[t.rel], outs[t.role].hash_name)

    rows, duplicate_rate = validate_files({t.role: t.path for t in targets}, spec.required_fields,
                                          spec.max_row_bytes)
    md5 = _combined_md5({t.role: file_md5[t.rel] for t in targets})
    paths = {t.role: str(t.path) for t in targets}
    logger.info(
        "data %s (%s): rows %s, train duplicate rate %.3f, md5 %s",
        repo_root, how, ", ".join(f"{k}={v}" for k, v in rows.items()), duplicate_rate, md5,
    )
    return DatasetRef(
        repo=str(repo_root),
        train_path=paths["train"],
        validation_path=paths["validation"],
        eval_path=paths.get("eval"),
        md5=md5,
        file_md5=file_md5,
        eval_md5=next((file_md5[t.rel] for t in targets if t.role == "eval"), None),
        validation_md5=next((file_md5[t.rel] for t in targets if t.role == "validation"), None),
        rows=rows,
        duplicate_rate=duplicate_rate,
    )


# ---------------------------------------------------------------------------------------------
# DVC
# ---------------------------------------------------------------------------------------------


def _roles(spec: DataSpec) -> dict[str, str]:
    roles = {"train": spec.train, "validation": spec.validation}
    if spec.eval:
        roles["eval"] = spec.eval
    return roles


@contextlib.contextmanager
def _open_repo(repo_root: Path):
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    site_cache = gauntlet_home() / "dvc-site-cache"
    site_cache.mkdir(parents=True, exist_ok=True)
    try:
        repo = Repo(str(repo_root), config={"core": {"site_cache_dir": str(site_cache)}})
    except DvcException as exc:
        raise DataError(f"cannot open the DVC repository {str(repo_root)!r}: {exc}") from exc
    try:
        yield repo
    finally:
        repo.close()


def _remote_description(repo: Repo, name: str | None) -> str:
    """'name (url)' of the remote in use; DataError when the spec names an unknown one."""
    remotes = repo.config.get("remote", {})
    if name is not None and name not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        raise DataError(
            f"data.remote names DVC remote {name!r}, which {repo.root_dir}/.dvc/config does not define "
            f"(configured: {known}). Fix: `dvc remote add {name} URL`, or set data.remote to one of them "
            "(or leave it out for the default remote)."
        )
    name = name or repo.config.get("core", {}).get("remote")
    if not name:
        return "(no DVC remote configured)"
    url = redact_uri(remotes.get(name, {}).get("url", "?"))
    return f"{name!r} ({url})"


def _find_out(repo: Repo, target: _Target) -> Output:
    """The stage or .dvc output that tracks ``target`` (a file output, or a file inside a directory output)."""
    from dvc.exceptions import OutputNotFoundError

    try:
        outs = repo.find_outs_by_path(str(target.path), strict=False)
    except OutputNotFoundError:
        raise DataError(
            f"data.{target.role}: {target.rel!r} is neither an output of a stage in dvc.yaml nor tracked "
            f"by a .dvc file in {repo.root_dir}. Fix: list it under a stage's `outs` in dvc.yaml (and "
            f"`dvc repro`), or run `dvc add {target.rel}`; then `dvc push`."
        ) from None
    return outs[0]


def _stage_target(stage: DvcStage) -> str:
    """An unambiguous, cwd-independent address for ``repo.reproduce``: '/abs/dvc.yaml:name' or '/abs/x.dvc'."""
    name = getattr(stage, "name", None)
    return f"{stage.path}:{name}" if name else str(stage.path)


def _workspace_state(repo: Repo, target: _Target) -> str:
    """'ok', 'missing', 'unrecorded' (DVC records no md5 yet) or 'modified'."""
    from dvc.exceptions import OutputNotFoundError

    if not target.path.is_file():
        return "missing"
    try:
        recorded = _recorded_md5(repo, target)   # DataError: no md5 recorded yet
        out = repo.find_outs_by_path(str(target.path), strict=False)[0]
    except (DataError, OutputNotFoundError):
        return "unrecorded"
    return "ok" if _file_md5(target.path, out.hash_name) == recorded else "modified"


def _pull_or_reproduce(repo: Repo, spec: DataSpec, targets: list[_Target], outs: dict, remote: str,
                       attempts: int = PULL_ATTEMPTS, backoff_s: float = PULL_BACKOFF_S) -> str:
    paths = sorted({str(t.path) for t in targets})
    for attempt in range(1, attempts + 1):
        result, failure, passing = _pull_once(repo, spec, targets, paths)
        if passing is None:
            break
        if attempt == attempts:
            raise DataUnavailable(f"`dvc pull` from {remote} failed {attempts} times: {passing}. Nothing was "
                                  "reproduced or pushed. Fix: check the remote's address and the network (or the "
                                  f"process holding DVC's lock in {repo.root_dir}), then run again.") from failure
        delay = backoff_s * 2 ** (attempt - 1)
        logger.warning("`dvc pull` attempt %d of %d failed: %s; trying again in %.0fs", attempt, attempts, passing, delay)
        time.sleep(delay)
    if failure is None:
        stats = result.get("stats", {})
        logger.info("pulled %s from DVC remote %s (fetched %s, added %s, modified %s)",
                    ", ".join(t.rel for t in targets), remote,
                    stats.get("fetched", 0), stats.get("added", 0), stats.get("modified", 0))
        return "pulled"

    states = {t.rel: _workspace_state(repo, t) for t in targets}
    missing = [t for t in targets if states[t.rel] != "ok"]
    logger.warning("`dvc pull` from %s did not provide %s: %s",
                   remote, ", ".join(t.rel for t in missing) or "every file", failure)
    modified = [t.rel for t in missing if states[t.rel] == "modified"]
    if modified:
        raise DataError(_modified_message(repo, modified)) from failure

    if not spec.reproducible:
        if not missing:
            logger.warning("using the working copies, which match the md5s DVC records; run `dvc push` "
                           "so that other machines can pull this data version")
            return "workspace"
        raise DataError(_missing_message(repo, remote, missing, states, outs)) from failure

    stages = {}
    for t in missing or targets:
        stage = outs[t.role].stage
        if not stage.cmd:
            raise DataError(
                _missing_message(repo, remote, [t], states, outs)
                + f" ({t.rel!r} is tracked by {os.path.relpath(stage.path, repo.root_dir)}, a data source "
                "with no command, so `dvc repro` cannot rebuild it.)"
            ) from failure
        stages[_stage_target(stage)] = stage
    _reproduce(repo, list(stages.values()))
    _push(repo, spec, paths, remote)
    return "reproduced"


def _pull_once(repo: Repo, spec: DataSpec, targets: list[_Target], paths: list[str]):
    """One `dvc pull`: (result, error, why a retry may help), each None where it does not apply."""
    from dvc.config import NoRemoteError
    from dvc.exceptions import CheckoutError, DownloadError, DvcException
    from dvc.lock import LockError

    try:
        return repo.pull(targets=paths, remote=spec.remote), None, None
    except LockError as exc:
        return None, exc, f"the DVC repository is locked by another process ({exc})"
    except NoRemoteError as exc:
        return None, exc, None
    except (CheckoutError, DownloadError) as exc:
        # DVC reports a remote it cannot reach as one that lacks the files: ask the remote itself.
        why = unreachable(repo, spec.remote)
        return None, exc, (f"the DVC remote does not answer ({why})" if why else None)
    except DvcException as exc:
        if cause := network_cause(exc):
            return None, exc, f"network error ({cause})"
        # e.g. "Can't remove the following unsaved files": a working file differs from dvc.lock.
        modified = [t.rel for t in targets if _workspace_state(repo, t) == "modified"]
        if modified:
            raise DataError(_modified_message(repo, modified)) from exc
        raise DataError(f"`dvc pull` failed in {repo.root_dir}: {exc}") from exc


def _reproduce(repo: Repo, stages: list[DvcStage]) -> None:
    from dvc.exceptions import DvcException

    names = ", ".join(s.addressing for s in stages)
    logger.info("reproducing DVC stage(s) %s in %s", names, repo.root_dir)
    # Stage commands say `python`: make that the interpreter running Gauntlet (its venv first on PATH).
    run_env = {"PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    try:
        ran = {_stage_target(s) for s in repo.reproduce(targets=[_stage_target(s) for s in stages],
                                                          run_env=run_env)}
        # A stage DVC skipped as unchanged may have outputs that are missing from the cache (a
        # cleared cache): commit stores them so that the push below has something to send.
        for stage in stages:
            if _stage_target(stage) not in ran:
                repo.commit(target=_stage_target(stage), force=True)
    except DvcException as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise DataError(
            f"reproducing DVC stage(s) {names} failed: {exc}{cause}. Fix: run `dvc repro` in "
            f"{repo.root_dir} to see the command's output."
        ) from exc


def _push(repo: Repo, spec: DataSpec, paths: list[str], remote: str) -> None:
    from dvc.config import NoRemoteError
    from dvc.exceptions import DvcException

    try:
        pushed = repo.push(targets=paths, remote=spec.remote)
    except NoRemoteError:
        logger.warning("no DVC remote is configured in %s: the reproduced data stays local. Fix: "
                       "`dvc remote add -d NAME URL`, then `dvc push`.", repo.root_dir)
        return
    except DvcException as exc:
        logger.warning("`dvc push` to %s failed: %s. The reproduced data is used but other machines cannot "
                       "pull it; fix the remote, then run `dvc push` in %s.", remote, exc, repo.root_dir)
        return
    logger.info("pushed %d file(s) to DVC remote %s", pushed, remote)


def _recorded_md5(repo: Repo, target: _Target) -> str:
    """The md5 DVC records for ``target`` (dvc.lock / .dvc file; a directory output's manifest)."""
    out = repo.find_outs_by_path(str(target.path), strict=False)[0]
    value = out.hash_info.value if out.hash_info else None
    if value and out.hash_info.isdir:
        obj = out.get_obj(filter_info=str(target.path))
        value = obj.hash_info.value if obj is not None and obj.hash_info else None
    if value is None:
        raise DataError(
            f"DVC records no md5 for {target.rel!r} (stage {out.stage.addressing} has no dvc.lock entry "
            f"for it). Fix: `dvc repro` (or `dvc commit`) in {repo.root_dir} and commit dvc.lock."
        )
    return value


def _file_md5(path: Path, hash_name: str) -> str:
    from dvc_data.hashfile.hash import file_md5

    return file_md5(str(path), name=hash_name)  # 'md5', or 'md5-dos2unix' for DVC 2 lock files


def _verify_md5(target: _Target, recorded: str, hash_name: str) -> None:
    if not target.path.is_file():
        raise DataError(f"{target.rel!r} is missing after `dvc pull`. Fix: run `dvc checkout {target.rel}` in "
                        "the DVC repo and check `dvc status`.")
    actual = _file_md5(target.path, hash_name)
    if actual != recorded:
        raise DataError(
            f"{str(target.path)!r} has md5 {actual}, but DVC records {recorded}. Fix: `dvc checkout --force "
            f"{target.rel}` restores the recorded version (or `dvc commit` records the edited file)."
        )


def _modified_message(repo: Repo, rels: list[str]) -> str:
    return (
        f"working file(s) {', '.join(map(repr, rels))} in {repo.root_dir} differ from the md5s DVC records "
        "(local edits?). Fix: `dvc checkout --force " + " ".join(rels) + "` restores the recorded version, "
        "or `dvc commit` / `dvc repro` records the edited data as a new version."
    )


def _missing_message(repo: Repo, remote: str, missing: list[_Target], states: dict, outs: dict) -> str:
    names = ", ".join(repr(t.rel) for t in missing)
    if any(states.get(t.rel) == "unrecorded" or outs[t.role].hash_info.value is None for t in missing):
        return (
            f"DVC records no data version for {names} in {repo.root_dir} (no dvc.lock entry yet), so there "
            f"is nothing to pull (DVC remote: {remote}). Fix: run `dvc repro` there, commit dvc.lock and "
            "`dvc push`; or set data.reproducible: true to let the pipeline reproduce it."
        )
    if remote.startswith("("):
        return (
            f"{names} are not in the local DVC cache and {repo.root_dir} has no DVC remote to pull them from. "
            "Fix: `dvc remote add -d NAME URL` and `dvc push` from the clone where the data was produced, "
            "or set data.reproducible: true to rebuild it here with `dvc repro`."
        )
    return (
        f"DVC remote {remote} lacks the data for {names} and the local cache does not have it either. "
        "Fix: run `dvc push` from the clone where the data was produced, or set data.reproducible: true "
        "to rebuild it here with `dvc repro`."
    )


def _combined_md5(role_md5: dict[str, str]) -> str:
    """The data version: md5 of the sorted 'role:md5' lines (so swapping train and validation changes it)."""
    text = "\n".join(sorted(f"{role}:{md5}" for role, md5 in role_md5.items()))
    return hashlib.md5(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the data version DVC records, read without DVC (the stage's cache key)
# ---------------------------------------------------------------------------------------------


def recorded_version(spec: DataSpec, root: Path | None = None) -> dict[str, str | None]:
    """The md5s dvc.lock / .dvc files record for the spec's targets (cheap: no DVC import)."""
    import yaml

    repo_root = (Path(root or project_root()) / spec.repo).resolve()
    recorded: dict[str, str | None] = {}
    lock = repo_root / "dvc.lock"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) if lock.exists() else {}
    outs = {o["path"]: o.get("md5") for st in stages.values() for o in st.get("outs", [])}
    for rel in _roles(spec).values():
        dvc_file = repo_root / f"{rel}.dvc"
        if dvc_file.exists():
            recorded[rel] = ((yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}])[0].get("md5")
        else:
            recorded[rel] = outs.get(rel)
    return recorded
