"""Local task configs for lm-evaluation-harness: the fixtures' and the user's own task YAMLs, their data paths
made absolute, and lm-eval's task index pointed at them.

Local task YAMLs name their data files relative to the project root; before a run, their entries in lm-eval's
task index are replaced by configs whose data paths are absolute, so lm-eval loads them exactly as its CLI
would with ``--include_path``, from any working directory. A task that reads the run's own evaluation file
(``metadata.uses_run_eval_data``) gets that file as its test split. No Prefect here.
"""

from __future__ import annotations

import functools
import logging
import threading
from pathlib import Path
from typing import Any

from gauntlet.eval.suites import FIXTURE_PREFIX, EvalTaskPlan, local_tasks, read_yaml
from gauntlet.project import in_project
from gauntlet.state import gauntlet_home

log = logging.getLogger(__name__)

LOCAL_DATA_BUILDERS = ("json", "csv", "parquet", "text", "arrow")


class EvalError(ValueError):
    """An evaluation that cannot run as configured (unknown task, missing data file, model that won't load, …)."""


def _resolve_data_path(path: str) -> str:
    p = Path(path)
    return str(in_project(p))


def find_task_yaml(tasks_dir: Path, task: str) -> Path:
    """The YAML under ``tasks_dir`` that defines ``task`` (or is named ``<task>.yaml``); EvalError if none."""
    known = local_tasks(tasks_dir)
    if task in known:
        return known[task]
    found = sorted(tasks_dir.rglob(f"{task}.yaml")) if tasks_dir.is_dir() else []
    if found:
        return found[0]
    where = f"folder {str(tasks_dir)!r}" + ("" if tasks_dir.is_dir() else " (which does not exist)")
    names = sorted(n for n in known if not n.startswith(FIXTURE_PREFIX))
    raise EvalError(f"eval task {task!r}: no task YAML defines it in {where}; task YAMLs there: {names}")


def config_from_yaml(path: Path, task: str, eval_data_path: str | None) -> dict[str, Any]:
    """A task YAML as an lm-eval config dict, with its local data files made absolute.

    A task marked ``metadata.uses_run_eval_data`` reads ``eval_data_path`` (when given) for its test
    split. Raises EvalError when a local data file does not exist.
    """
    from lm_eval.tasks._yaml_loader import (
        load_yaml,  # resolves include: and !function like lm-eval does
    )

    cfg = load_yaml(path, resolve_func=True)
    if not isinstance(cfg.get("task"), str):
        raise EvalError(f"eval task {task!r}: {path} is a group YAML, not a task")
    if cfg.get("dataset_path") not in LOCAL_DATA_BUILDERS:
        return cfg  # a hub dataset: only usable where the hub (or its cache) is reachable
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    data_files = kwargs.get("data_files")
    if isinstance(data_files, str):
        data_files = {cfg.get("test_split") or "test": data_files}
    data_files = dict(data_files or {})
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    if eval_data_path and meta.get("uses_run_eval_data"):
        split = cfg.get("test_split") or "test"
        log.info("task %s: %s split from %s", task, split, eval_data_path)
        data_files[split] = eval_data_path
    resolved: dict[str, Any] = {}
    for split, files in data_files.items():
        files_list = [files] if isinstance(files, str) else list(files)
        absolute = [_resolve_data_path(f) for f in files_list]
        for f in absolute:
            if not Path(f).is_file():
                hint = ("pass the run's eval data (eval_data_path) or produce it with `dvc repro`"
                        if meta.get("uses_run_eval_data") else "check dataset_kwargs.data_files in the YAML")
                raise EvalError(f"eval task {task!r} ({path}): data file {f} for split {split!r} not found; {hint}")
        resolved[split] = absolute[0] if isinstance(files, str) else absolute
    kwargs["data_files"] = resolved
    # keep the datasets cache with the rest of Gauntlet's state, not in ~/.cache
    kwargs.setdefault("cache_dir", str(gauntlet_home() / "cache" / "hf-datasets"))
    cfg["dataset_kwargs"] = kwargs
    return cfg


def task_config(task: str, tasks_dir: Path, eval_data_path: str | None) -> dict[str, Any]:
    """The config of the single task ``task`` defined under ``tasks_dir`` (see :func:`config_from_yaml`)."""
    cfg = config_from_yaml(find_task_yaml(tasks_dir, task), task, eval_data_path)
    cfg["task"] = task
    return cfg


# One evaluation at a time per process: the shared task index holds a run's resolved data paths.
INDEX_LOCK = threading.Lock()


@functools.lru_cache(maxsize=4)
def _task_manager(tasks_dir: Path, with_engine_tasks: bool, _signature: tuple):
    from lm_eval.tasks import TaskManager

    # The engine's own catalogue (thousands of YAMLs, ~10 s to index) only when a task needs it.
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=with_engine_tasks)
    manager._gauntlet_local = {  # our YAMLs, remembered before any entry is replaced
        name: entry.yaml_path for name, entry in manager.task_index.items()
        if entry.yaml_path is not None and Path(entry.yaml_path).resolve().is_relative_to(tasks_dir)}
    return manager


def task_manager_for(plan: EvalTaskPlan, tasks_dir: Path, eval_data_path: str | None):
    """lm-eval's TaskManager for one plan, its local tasks' data paths made absolute."""
    from lm_eval.tasks._index import Kind

    tasks_dir = Path(tasks_dir).resolve()
    signature = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in tasks_dir.rglob("*.yaml")))
    manager = _task_manager(tasks_dir, plan.source == "engine", signature)
    index, local = manager.task_index, manager._gauntlet_local
    if plan.engine_task not in index:
        where = "lm-eval's task catalogue" if plan.source == "engine" else f"the task YAMLs in {str(tasks_dir)!r}"
        raise EvalError(f"eval task {plan.name!r}: {plan.engine_task!r} is not a task or group in {where}")
    pending, seen = [plan.engine_task], set()
    while pending:  # the task, or the group and everything in it
        name = pending.pop()
        entry = index.get(name)
        if name in seen or entry is None:
            continue
        seen.add(name)
        if entry.kind == Kind.GROUP:
            cfg = read_yaml(Path(entry.yaml_path)) if entry.yaml_path else (entry.cfg or {})
            items = cfg.get("task")
            items = items if isinstance(items, list) else []
            pending += [i if isinstance(i, str) else i.get("task") or i.get("group") for i in items]
        elif entry.kind == Kind.TAG:
            pending += sorted(entry.tags)
        elif name in local:
            entry.cfg = config_from_yaml(Path(local[name]), name, eval_data_path)
            entry.yaml_path = None  # lm-eval now builds the task from the resolved config
    return manager
