"""Named evaluation suites and the task catalogue: which lm-eval task each named task runs, and how.

``<tasks_dir>/suites.yaml`` holds two sections. ``tasks`` names each evaluation once: the lm-eval task
or group it runs on the real datasets (``task``), its offline stand-in under ``<tasks_dir>/fixtures``
(``fixture``), the metric a suite reports and normalizes, the task's random baseline, and its default
few-shot count and generation budget. ``suites`` lists task names under a suite name.

An evaluation config (``EvalSpec``) picks a ``suite``, lists ``tasks`` (names in the catalogue, or
task/group names defined by a YAML in the tasks folder: the user's own tasks), or both; each listed
task may set its own ``num_fewshot``, ``limit`` and ``max_gen_tokens``. :func:`plan_tasks` turns that
into one :class:`EvalTaskPlan` per task: the unit that is evaluated, cached and reported.

No Prefect, torch or lm-eval import here: config validation uses it and must stay instant.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gauntlet.project import in_project

SUITES_FILE = "suites.yaml"
FIXTURES_DIR = "fixtures"
FIXTURE_PREFIX = "fixture_"     # fixture task names: the real name with this prefix (evals/fixtures/build.py)


class SuiteError(ValueError):
    """A suite or task name that does not resolve (the message names it and lists what exists)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogTask(_Strict):
    task: str = Field(..., description="lm-eval task or group run on the real data (registered, or a YAML here)")
    fixture: str | None = Field(None, description="offline stand-in: a task or group defined under fixtures/")
    metric: str = Field(..., description="the reported metric as lm-eval names it: 'acc', 'exact_match,strict-match'")
    random_baseline: float | None = Field(
        None, ge=0, lt=1, description="score of random guessing; default: mean of 1/choices over the items "
                                      "scored (multiple choice), 0 (generation)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot count (None: the task YAML's own)")
    max_gen_tokens: int | None = Field(None, gt=0, description="generation budget (None: the task YAML's own)")
    items: int | None = Field(None, gt=0, description="items the real dataset's test split holds (planning a night)")
    description: str = ""


class Suite(_Strict):
    description: str = ""
    tasks: list[str] = Field(..., min_length=1)


class Catalog(_Strict):
    tasks: dict[str, CatalogTask] = {}
    suites: dict[str, Suite] = {}


class EvalTaskPlan(_Strict):
    """One task of an evaluation, resolved: what runs, on which data, with which settings."""

    name: str                                   # the name in the report (catalogue or local task name)
    engine_task: str                            # the lm-eval task or group that runs
    source: Literal["fixture", "engine", "local"]
    yaml_path: str | None = None                # the defining YAML (fixture or local task), else None
    metric: str
    random_baseline: float | None = None        # declared; None: measured from the items (eval_engine.chance_of)
    num_fewshot: int | None = None              # None: the task's own (its YAML's num_fewshot, else 0)
    limit: int | None = None
    max_gen_tokens: int | None = None           # None: the task's own generation_kwargs.max_gen_toks
    uses_run_eval_data: bool = False            # reads the run's evaluation file (DatasetRef.eval_path)
    content_sha: str | None = None              # hash of its YAMLs and local data files (None: engine's own)

    @property
    def local(self) -> bool:
        return self.source != "engine"


# ---------------------------------------------------------------------------------------------
# reading the tasks folder
# ---------------------------------------------------------------------------------------------


class _TolerantLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without importing anything: ``!function x`` stays the string x."""


_TolerantLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def read_yaml(path: Path) -> dict[str, Any]:
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=_TolerantLoader)  # noqa: S506 - safe loader subclass
    return data if isinstance(data, dict) else {}


def _signature(folder: Path) -> tuple:
    files = sorted(folder.rglob("*.yaml")) if folder.is_dir() else []
    return tuple((str(p), p.stat().st_mtime_ns) for p in files)


def local_tasks(tasks_dir: Path) -> dict[str, Path]:
    """Every task or group name defined by a YAML under ``tasks_dir`` → its file (suites.yaml excluded)."""
    return dict(_local_tasks(Path(tasks_dir).resolve(), _signature(Path(tasks_dir))))


@functools.lru_cache(maxsize=16)
def _local_tasks(tasks_dir: Path, _sig: tuple) -> tuple[tuple[str, Path], ...]:
    found: dict[str, Path] = {}
    for path in sorted(tasks_dir.rglob("*.yaml")):
        if path.name == SUITES_FILE:
            continue
        try:
            cfg = read_yaml(path)
        except yaml.YAMLError:
            continue
        name = cfg.get("group") if isinstance(cfg.get("group"), str) else cfg.get("task")
        if isinstance(name, str):
            found.setdefault(name, path)
    return tuple(found.items())


def load_catalog(tasks_dir: Path) -> Catalog:
    """``<tasks_dir>/suites.yaml`` (an empty catalogue if there is none). SuiteError if it is invalid."""
    path = Path(tasks_dir) / SUITES_FILE
    if not path.is_file():
        return Catalog()
    return _load_catalog(path.resolve(), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _load_catalog(path: Path, _mtime: int) -> Catalog:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        catalog = Catalog.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as e:
        raise SuiteError(f"{path}: invalid suite catalogue: {e}") from None
    for suite, body in catalog.suites.items():
        unknown = [t for t in body.tasks if t not in catalog.tasks]
        if unknown:
            raise SuiteError(f"{path}: suite {suite!r} lists {unknown}, which are not under 'tasks:'")
    return catalog


def _task_files(cfg: dict[str, Any], yaml_path: Path) -> list[Path]:
    """The YAML itself, what it includes, and its local data files (relative to the repository root)."""
    files = [yaml_path]
    include = cfg.get("include")
    for inc in include if isinstance(include, list) else [include] if include else []:
        inc_path = Path(inc) if Path(inc).is_absolute() else yaml_path.parent / inc
        if inc_path.is_file():
            files += _task_files(read_yaml(inc_path), inc_path)
    data_files = (cfg.get("dataset_kwargs") or {}).get("data_files") or {}
    if isinstance(data_files, str):
        data_files = {"test": data_files}
    meta = cfg.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    for split, entry in data_files.items():
        if meta.get("uses_run_eval_data") and split == (cfg.get("test_split") or "test"):
            continue  # the run's eval data: its DVC md5 is part of the cache key instead
        for f in [entry] if isinstance(entry, str) else list(entry):
            p = in_project(f)
            if p.is_file():
                files.append(p)
    return files


def _members(cfg: dict[str, Any]) -> list[str]:
    items = cfg.get("task")
    items = items if isinstance(items, list) else []
    return [i if isinstance(i, str) else i.get("task") or i.get("group") for i in items if i]


def describe_local(name: str, tasks_dir: Path) -> dict[str, Any]:
    """Content hash, few-shot pool and run-data use of a local task or group (members included)."""
    known = local_tasks(tasks_dir)
    files: list[Path] = []
    pools: list[int] = []
    uses_run_data = False
    pending, seen = [name], set()
    while pending:
        current = pending.pop()
        if current in seen or current not in known:
            continue
        seen.add(current)
        cfg = read_yaml(known[current])
        files += _task_files(cfg, known[current])
        meta = cfg.get("metadata")
        meta = meta if isinstance(meta, dict) else {}
        uses_run_data = uses_run_data or bool(meta.get("uses_run_eval_data"))
        if isinstance(meta.get("fewshot_pool"), int):
            pools.append(meta["fewshot_pool"])
        pending += _members(cfg)
    h = hashlib.sha256()
    for f in sorted(set(files)):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return {"sha": h.hexdigest()[:16], "fewshot_pool": min(pools) if pools else None,
            "uses_run_eval_data": uses_run_data}


# ---------------------------------------------------------------------------------------------
# resolving a config's tasks
# ---------------------------------------------------------------------------------------------


def tasks_dir_of(spec: Any) -> Path:
    """The EvalSpec's tasks folder (relative paths are relative to the repository root)."""
    return in_project(spec.tasks_dir)


def requested(suite: str | None, tasks: list, catalog: Catalog) -> list[tuple[str, dict[str, Any]]]:
    """(name, per-task overrides) in order: the suite's tasks, then listed ones (a listed name wins)."""
    out: dict[str, dict[str, Any]] = {}
    if suite:
        for name in catalog.suites[suite].tasks:
            out[name] = {}
    for item in tasks:
        if isinstance(item, str):
            out.setdefault(item, {})
        else:
            out[item.name] = item.model_dump(exclude={"name"}, exclude_none=True)  # an EvalTaskSpec
    return list(out.items())


def check_suite(suite: str, tasks_dir: Path) -> None:
    catalog = load_catalog(tasks_dir)
    if suite not in catalog.suites:
        raise SuiteError(f"unknown suite {suite!r}; suites in {str(Path(tasks_dir) / SUITES_FILE)!r}: "
                         f"{sorted(catalog.suites)}")


def task_problems(names: list[str], fixtures: bool, tasks_dir: Path) -> list[str]:
    """What is wrong with these task names (empty when every one resolves)."""
    catalog = load_catalog(tasks_dir)
    known = local_tasks(tasks_dir)
    problems = []
    unknown = [n for n in names if n not in catalog.tasks and n not in known]
    if unknown:
        problems.append(f"unknown eval task(s) {unknown}; named tasks in {SUITES_FILE}: {sorted(catalog.tasks)}; "
                        f"task YAMLs in {str(tasks_dir)!r}: {sorted(n for n in known if not n.startswith(FIXTURE_PREFIX))}")
    for n in names:
        entry = catalog.tasks.get(n)
        if entry is None:
            continue
        if fixtures and not entry.fixture and entry.task not in known:
            problems.append(f"task {n!r} has no offline fixture; set eval.fixtures: false to use its real data")
        if fixtures and entry.fixture and entry.fixture not in known:
            problems.append(f"task {n!r}: its fixture {entry.fixture!r} is defined by no YAML in {str(tasks_dir)!r}")
    return problems


def plan_tasks(spec: Any, tasks_dir: Path | None = None) -> list[EvalTaskPlan]:
    """One EvalTaskPlan per task the EvalSpec asks for. SuiteError names what does not resolve.

    Precedence of a setting (few-shot count, generation budget, limit), first set wins: the task's own
    entry in the config (``eval.tasks: [{name, num_fewshot}]``), the eval section (``eval.num_fewshot``),
    the catalogue entry in suites.yaml, then the task YAML itself (lm-eval applies its own value when we
    pass None). With fixtures, an explicit few-shot count is capped at the fixture's few-shot pool.
    """
    tasks_dir = tasks_dir or tasks_dir_of(spec)
    catalog = load_catalog(tasks_dir)
    if spec.suite:
        check_suite(spec.suite, tasks_dir)
    wanted = requested(spec.suite, list(spec.tasks), catalog)
    if not wanted:
        raise SuiteError("no eval tasks: name a suite (eval.suite) or list tasks (eval.tasks)")
    problems = task_problems([n for n, _ in wanted], spec.fixtures, tasks_dir)
    if problems:
        raise SuiteError("; ".join(problems))
    known = local_tasks(tasks_dir)
    plans = []
    for name, own in wanted:
        entry = catalog.tasks.get(name)
        if entry is None:  # the user's own task: a YAML in the tasks folder, same in both modes
            engine_task, source, metric, baseline, default_shots, default_gen = name, "local", None, None, None, None
        else:
            use_fixture = spec.fixtures and entry.fixture is not None
            engine_task = entry.fixture if use_fixture and entry.fixture is not None else entry.task
            source = "fixture" if use_fixture else "local" if engine_task in known else "engine"
            metric, baseline = entry.metric, entry.random_baseline
            default_shots, default_gen = entry.num_fewshot, entry.max_gen_tokens
        info = describe_local(engine_task, tasks_dir) if source != "engine" else {}
        yaml_path = known.get(engine_task)
        if metric is None:
            metric = _first_metric(yaml_path) if yaml_path else "acc"
            meta = read_yaml(yaml_path).get("metadata") if yaml_path else None
            declared = meta.get("random_baseline") if isinstance(meta, dict) else None
            baseline = None if declared is None else float(declared)
        shots = first_set(own.get("num_fewshot"), spec.num_fewshot, default_shots)
        if shots is not None and source == "fixture" and info.get("fewshot_pool") is not None:
            shots = min(shots, info["fewshot_pool"])
        plans.append(EvalTaskPlan(
            name=name, engine_task=engine_task, source=source,
            yaml_path=str(yaml_path) if yaml_path else None, metric=metric, random_baseline=baseline,
            num_fewshot=shots, limit=own.get("limit", spec.limit),
            max_gen_tokens=first_set(own.get("max_gen_tokens"), spec.max_gen_tokens, default_gen),
            uses_run_eval_data=bool(info.get("uses_run_eval_data")), content_sha=info.get("sha"),
        ))
    return plans


def first_set(*values: Any) -> Any:
    """The first value that is not None (a setting's precedence: see :func:`plan_tasks`)."""
    return next((v for v in values if v is not None), None)


def _first_metric(yaml_path: Path) -> str:
    """A local task's reported metric: its first metric (under its first filter, if it has filters)."""
    cfg = read_yaml(yaml_path)
    if isinstance(cfg.get("group"), str):
        agg = cfg.get("aggregate_metric_list") or [{}]
        metric = agg[0].get("metric", "acc")
        filt = agg[0].get("filter_list")
        return f"{metric},{filt}" if isinstance(filt, str) and filt != "none" else metric
    metric = ((cfg.get("metric_list") or [{}])[0]).get("metric", "acc")
    filters = cfg.get("filter_list") or []
    return f"{metric},{filters[0]['name']}" if filters and filters[0].get("name") not in (None, "none") else metric


def declared_scores(yaml_path: Path) -> tuple[list[str], list[str]]:
    """A local task's metric names and filter names as its YAML declares them (or the YAML it includes)."""
    cfg = read_yaml(yaml_path)
    base = yaml_path.parent / cfg["include"] if isinstance(cfg.get("include"), str) else None
    metrics, filters = declared_scores(base) if base is not None and base.is_file() else ([], [])
    own_metrics = [m["metric"] for m in cfg.get("metric_list") or [] if isinstance(m, dict) and m.get("metric")]
    own_filters = [f["name"] for f in cfg.get("filter_list") or [] if isinstance(f, dict) and f.get("name")]
    return own_metrics or metrics, own_filters or filters


def filters_a_name_fits(tasks_dir: Path, task: str, metric: str) -> list[str]:
    """The filters of local task ``task`` a metric name without a filter (``exact_match``) could mean: two or more
    and the name is ambiguous (:meth:`gauntlet.refs.EvalReport.resolve` refuses it). [] for a name with a filter,
    a task not defined under ``tasks_dir``, or a metric it does not declare."""
    path = local_tasks(tasks_dir).get(task)
    if "," in metric or path is None:
        return []
    metrics, filters = declared_scores(path)
    return [f for f in filters if f != "none"] if metric in metrics else []


def normalized_score(value: float, random_baseline: float) -> float:
    """The Open LLM Leaderboard's normalization: 0 at the random baseline (and below), 100 at a perfect score."""
    if random_baseline >= 1:
        raise ValueError("random_baseline must be below 1")
    return max(0.0, (value - random_baseline) / (1.0 - random_baseline)) * 100.0
