"""``@stage``: the one way a pipeline stage is declared. It makes a Prefect task that carries the stage's
cache key, its receipt and its MLflow stage run, so no call site pairs them by hand.

    @stage("train", key=lambda spec, model, data: [spec, model.sha, data.md5],
           outputs=lambda trained, st: [trained.merged.path, st.out / "result.json"],
           retries=2, retry_delay_seconds=10, permanent=(TrainingConfigError,), resumable=True)
    def train(spec: TrainSpec, model: ModelRef, data: DatasetRef, stage: StageRun) -> TrainedModel:
        ...

    trained = train(spec=spec.train, model=base, data=data, run=run)   # in a flow: keywords, plus the run

* **Cache key** = sha256(name, code version, ``key(**inputs)``). The code version hashes every Gauntlet module
  the stage's module imports, found from its imports (:mod:`gauntlet.code_version`); config sections in the
  key parts are compared as their JSON. ``key=None``: never cached (the stage reads the registry's state).
* **Receipt** (:mod:`gauntlet.receipts`): a cached stage writes into ``$GAUNTLET_HOME/stages/<name>/<key[:16]>/``
  (``stage.out``) and leaves ``receipt.json`` naming its ``outputs`` and holding its result as JSON (written
  atomically). With a shared MLflow (a team's pool) the receipt and the outputs inside the stage folder are also
  the stage run's artifacts, found by the key from every host and fetched on demand into that host's folder: a
  stage computed on one host is a cache hit on all of them. A call whose receipt, or a file it names, is gone
  everywhere refreshes the cache, so a hit never hands back dangling paths; an unreadable receipt is a cache
  miss, logged as such; a call whose receipt is fine touches it (``gauntlet gc`` keeps what was used recently).
* **One run per key at a time**: the body runs under a lock on the key, so two flow runs with the same key never
  compute it twice; the second waits, then takes the result the first recorded instead of computing it again.
  With a Prefect server (``PREFECT_API_URL``) the lock is one of its global concurrency limits, one slot per
  key, held on a lease (a holder whose host dies loses it within a minute): every host of the pool waits on the
  same one. With Prefect's ephemeral server (one machine) it is a file lock in the output folder.
* **No pickles**: Prefect persists a cached stage's result as JSON; uncached stages persist nothing.
* **MLflow**: a nested run named ``run_name`` under the flow's parent run, with ``params(**inputs)``; FAILED
  with the error when the body raises; tagged with its key. ``resumable``: a retry within the same flow run (on
  any host) continues the failed attempt's run, so its metrics keep their steps. A result with an unset ``mlflow_run_id`` gets the stage run's.
* **Prefect**: retries, except for the ``permanent`` errors a retry cannot fix; ``run_name`` is also the task
  run's name (``str.format`` over the inputs).
* ``refresh(**inputs)``: True forces a fresh run (an unpinned model source); ``after(result, **inputs)``
  adjusts what every call returns, cached or not (a cached report named after the model asked about).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import logging
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from pydantic import BaseModel, TypeAdapter

from gauntlet import receipts
from gauntlet.code_version import code_version
from gauntlet.hashing import sha256_json
from gauntlet.receipts import KEY_TAG, Receipt
from gauntlet.state import shared_tracking, stage_dir
from gauntlet.tasks._key_lock import key_lock
from gauntlet.tracking import RunContext, client, stage_run


def _logger():
    try:
        return get_run_logger()
    except MissingContextError:   # called outside a flow or task run (a test, gc)
        return logging.getLogger(__name__)


def jsonable(value: Any) -> Any:
    """Key parts as JSON: pydantic models dumped, containers walked, paths as text."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


@dataclass
class StageRun:
    """What a stage's body gets besides its inputs: where to write, where to log."""

    name: str                     # the stage run's name (MLflow run and Prefect task run)
    flow: RunContext              # the flow's MLflow parent run
    out: Path | None = None       # the output folder of a cached stage
    client: Any = None            # MlflowClient (None for stages that keep no MLflow run)
    run_id: str | None = None     # this stage's MLflow run
    attempt: int = 1
    key: str | None = None        # the cache key of a cached stage

    @property
    def shared(self) -> bool:
        """True when the stage's MLflow store is shared by the pool's hosts (the store of its files)."""
        return shared_tracking(self.flow.tracking_uri)

    @property
    def log(self):
        return get_run_logger()

    def nested(self) -> RunContext:
        """A run context whose stages nest under this stage's MLflow run."""
        return self.flow.model_copy(update={"parent_run_id": self.run_id})

    def metric(self, key: str, value: float, step: int | None = None) -> None:
        self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def metrics(self, values: dict[str, Any], prefix: str = "") -> None:
        """Every float (or int) of ``values`` as a metric named ``prefix + key``."""
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.metric(prefix + k, v)

    def tag(self, key: str, value: Any) -> None:
        self.client.set_tag(self.run_id, key, str(value))

    def artifacts(self, *paths: Path | str, folder: str | None = None) -> None:
        """Upload the files that exist (a missing optional file is not an error)."""
        for p in paths:
            if Path(p).exists():
                self.client.log_artifact(self.run_id, str(p), folder)

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def json(self, obj: Any, name: str) -> None:
        self.client.log_dict(self.run_id, jsonable(obj), name)


class Stage:
    """A stage: its Prefect task plus what the call needs to honour receipts. Call it with keywords."""

    def __init__(self, fn: Callable, *, name: str, key: Callable[..., Any] | None, outputs: Callable | None,
                 params: Callable[..., dict] | None, run_name: str | None, mlflow: bool, resumable: bool,
                 refresh: Callable[..., bool] | None, after: Callable[..., Any] | None, task_options: dict[str, Any]):
        self.fn, self.name, self.key_parts, self.outputs = fn, name, key, outputs
        self.refresh, self.after = refresh, after
        self.params, self.run_name, self.mlflow, self.resumable = params, run_name or name, mlflow, resumable
        self.signature = inspect.signature(fn)
        if list(self.signature.parameters)[-1:] != ["stage"]:
            raise TypeError(f"stage {name}: the body's last parameter must be `stage: StageRun`")
        inputs = [p for n, p in self.signature.parameters.items() if n != "stage"]
        run = inspect.Parameter("run", inspect.Parameter.KEYWORD_ONLY, annotation=RunContext)
        def body(**params: Any) -> Any:
            return _run_stage(self, **params)

        functools.update_wrapper(body, fn)   # the stage's name, module and docstring in Prefect
        body.__signature__ = self.signature.replace(  # type: ignore[attr-defined]
            parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inputs] + [run])
        if key is None:
            options = {"cache_policy": NO_CACHE, "persist_result": False}
        else:
            options = {"cache_key_fn": self._cache_key_fn, "persist_result": True, "result_serializer": "json"}
        options.update({"task_run_name": run_name} if run_name else {})
        self.task = task(body, name=name, **options, **task_options)

    # -- identity -------------------------------------------------------------------------------

    @property
    def cached(self) -> bool:
        return self.key_parts is not None

    def _inputs(self, params: dict[str, Any]) -> dict[str, Any]:
        bound = self.signature.replace(
            parameters=[p for n, p in self.signature.parameters.items() if n != "stage"]).bind(
            **{k: v for k, v in params.items() if k != "run"})
        bound.apply_defaults()
        return dict(bound.arguments)

    def key(self, **params: Any) -> str:
        """The stage's cache key for these inputs (``run`` is never part of it)."""
        if self.key_parts is None:
            raise TypeError(f"stage {self.name} is not cached: it has no key")
        parts = jsonable(self.key_parts(**self._inputs(params)))
        return sha256_json([self.name, code_version(self.fn.__module__), parts])

    def _cache_key_fn(self, _context: Any, params: dict[str, Any]) -> str:
        return f"{self.name}-{self.key(**params)}"

    def output_dir(self, **params: Any) -> Path:
        return stage_dir(self.name, self.key(**params))

    def receipt(self, tracking_uri: str | None = None, fetch: bool = True, **params: Any) -> Receipt | None:
        """This key's receipt as this host sees it: its own copy when every file it names is here, else (with a
        shared MLflow) the one another host stored, its files fetched into this host's folder (``fetch``;
        without it, the receipt as stored). None: computed nowhere, or its files are gone."""
        out = self.output_dir(**params)
        local, why_not = receipts.read_local(out)
        if local is not None:
            return local
        if why_not != "no receipt":
            _logger().warning(f"{self.name}: {why_not}: a cache miss, computing it again")
        uri = tracking_uri or _tracking_uri(params)
        if not shared_tracking(uri):
            return None
        c = client(uri)
        stored = receipts.find(c, self.name, self.key(**params))
        if stored is None or not fetch:
            return stored
        try:
            return receipts.fetch(c, stored, out, echo=_logger().info)
        except OSError as e:   # gone from the store, or damaged on the way: computed again
            _logger().warning(f"{self.name}: the stored outputs of key {self.key(**params)[:16]} could not be "
                              f"fetched ({e}): a cache miss, computing it again")
            return None

    def receipt_ok(self, **params: Any) -> bool:
        return self.receipt(**params) is not None

    def result_from(self, receipt: Receipt) -> Any:
        """The result a receipt recorded, as the body's return type; None if it recorded none."""
        if not receipt.with_result:
            return None
        returns = typing.get_type_hints(self.fn).get("return", Any)
        return TypeAdapter(returns).validate_python(receipt.result)

    # -- calling ----------------------------------------------------------------------------------

    def __call__(self, **params: Any) -> Any:
        """Run the stage (or take its cached result, from this host or another); refresh the cache when the
        receipt's files are gone."""
        if "run" not in params:
            raise TypeError(f"stage {self.name} needs run=RunContext (the flow's MLflow run)")
        prefect_task = self.task
        receipt = None
        if self.cached:
            if self.refresh is not None and self.refresh(**self._inputs(params)):
                prefect_task = prefect_task.with_options(refresh_cache=True)
            elif (receipt := self.receipt(**params)) is not None:
                (self.output_dir(**params) / receipts.RECEIPT).touch()
            else:
                prefect_task = prefect_task.with_options(refresh_cache=True)
        result = prefect_task(**params)
        if receipt is not None and receipt.with_result:
            # a hit of Prefect's cache holds the paths of the host that computed it: the receipt's are this host's
            result = self.result_from(receipts.read_local(self.output_dir(**params))[0] or receipt)
        return self.after(result, **self._inputs(params)) if self.after else result

    def submit(self, **params: Any) -> Any:
        """Run an uncached stage concurrently (Prefect's task runner); returns its future."""
        if self.cached or self.after:
            raise TypeError(f"stage {self.name}: only uncached stages are submitted (receipts are checked on call)")
        return self.task.submit(**params)

    def with_options(self, **options: Any) -> Stage:
        """The same stage with other Prefect options (tags, refresh_cache, …)."""
        other = copy.copy(self)
        other.task = self.task.with_options(**options)
        return other


def _tracking_uri(params: dict[str, Any]) -> str:
    from gauntlet.tracking import tracking_uri

    run = params.get("run")
    return run.tracking_uri if isinstance(run, RunContext) else tracking_uri()


def _run_stage(st: Stage, **params: Any) -> Any:
    """The Prefect task's body: open the stage's output folder and MLflow run, run the stage, write the receipt."""
    run: RunContext = params.pop("run")
    inputs = st._inputs(params)
    name = st.run_name.format(**inputs)
    if not st.cached:
        return _run_body(st, name, run, inputs, None, None)[0]
    key = st.key(**inputs)
    out = st.output_dir(**inputs)
    out.mkdir(parents=True, exist_ok=True)
    seen = st.receipt(run.tracking_uri, fetch=False, **inputs)
    with key_lock(key, out, name):
        receipt = st.receipt(run.tracking_uri, **inputs)
        if receipt is not None and receipt.token != (seen.token if seen else None):
            result = st.result_from(receipt)   # recorded while this call waited: the other run's result
            if result is not None:
                _logger().info(f"{name}: reusing the result another run recorded for this key while this one waited")
                return result
        result, run_id = _run_body(st, name, run, inputs, out, key)
        paths = [str(p) for p in (st.outputs(result, StageRun(name=name, flow=run, out=out)) if st.outputs else [])]
        receipt = Receipt(stage=st.name, outputs=paths, token=uuid.uuid4().hex, result=jsonable(result),
                          with_result=True, run_id=run_id)
        try:
            json.dumps(receipt.result)
        except (TypeError, ValueError):   # a result JSON cannot hold: a waiting run computes its own
            receipt = receipt.model_copy(update={"result": None, "with_result": False})
        shared = client(run.tracking_uri) if shared_tracking(run.tracking_uri) and run_id else None
        receipts.write(receipt, out, shared)
    return result


def _run_body(st: Stage, name: str, run: RunContext, inputs: dict[str, Any], out: Path | None,
              key: str | None) -> tuple[Any, str | None]:
    """The stage's own function, inside its MLflow stage run (if it keeps one); (result, stage run id)."""
    if not st.mlflow:
        result = st.fn(**inputs, stage=StageRun(name=name, flow=run, out=out, client=client(run.tracking_uri)))
        return result, None
    resume_id, attempt = _earlier_attempt(run, key) if st.resumable and key else (None, 1)
    logged = {k: str(v) for k, v in (st.params(**inputs) if st.params else {}).items()}
    with stage_run(run, name, logged, resume_run_id=resume_id, tags={KEY_TAG: key} if key else None) as (c, run_id):
        if st.resumable and key:
            _record_attempt(c, run_id, attempt, resumed=resume_id is not None)
        result = st.fn(**inputs, stage=StageRun(name=name, flow=run, out=out, client=c, run_id=run_id,
                                                attempt=attempt, key=key))
    if (isinstance(result, BaseModel) and "mlflow_run_id" in type(result).model_fields
            and result.mlflow_run_id is None):   # a result that names another run keeps it
        result = result.model_copy(update={"mlflow_run_id": run_id})
    return result, run_id


def _earlier_attempt(run: RunContext, key: str) -> tuple[str | None, int]:
    """(MLflow run id to continue, attempt number): the stage run of this key under the same flow run's parent
    run (an earlier attempt, on this host or another), found on the MLflow store."""
    c = client(run.tracking_uri)
    earlier = c.search_runs([run.experiment_id], f"tags.`{KEY_TAG}` = '{key}' and "
                                                 f"tags.`mlflow.parentRunId` = '{run.parent_run_id}'",
                            order_by=["attributes.start_time DESC"], max_results=1)
    if not earlier:
        return None, 1
    return earlier[0].info.run_id, int(earlier[0].data.tags.get("gauntlet.attempt", "1")) + 1


def _record_attempt(c, run_id: str, attempt: int, resumed: bool) -> None:
    c.set_tag(run_id, "gauntlet.attempt", str(attempt))
    if resumed:
        get_run_logger().info(f"attempt {attempt}: continuing MLflow run {run_id}")
        earlier_error = c.get_run(run_id).data.tags.get("gauntlet.error")
        if earlier_error:   # keep the earlier attempt's error on record, under its own name
            c.set_tag(run_id, f"gauntlet.attempt_{attempt - 1}.error", earlier_error)
            c.delete_tag(run_id, "gauntlet.error")


def retry_unless(*permanent: type[BaseException]) -> Callable[..., bool]:
    """A Prefect ``retry_condition_fn``: retry flaky failures, not ones that a retry cannot fix."""

    def should_retry(_task: Any, _task_run: Any, state: Any) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except BaseException:
            return True
        return True

    return should_retry


def stage(name: str, *, key: Callable[..., Any] | None = None, outputs: Callable[[Any, StageRun], list] | None = None,
          params: Callable[..., dict] | None = None, run_name: str | None = None, mlflow: bool = True,
          resumable: bool = False, refresh: Callable[..., bool] | None = None, after: Callable[..., Any] | None = None,
          retries: int = 0, retry_delay_seconds: float = 0,
          permanent: tuple[type[BaseException], ...] = ()) -> Callable[[Callable], Stage]:
    """Declare a stage (see the module docstring). ``key``: the inputs' identity (None: never cached);
    ``outputs(result, stage)``: the files the receipt names; ``params(**inputs)``: MLflow params;
    ``mlflow=False``: no stage run of its own (it logs into the flow's run, if at all)."""
    task_options: dict[str, Any] = {}
    if retries:
        task_options.update(retries=retries, retry_delay_seconds=retry_delay_seconds,
                            retry_condition_fn=retry_unless(*permanent))

    def declare(fn: Callable) -> Stage:
        return Stage(fn, name=name, key=key, outputs=outputs, params=params, run_name=run_name, mlflow=mlflow,
                     resumable=resumable, refresh=refresh, after=after, task_options=task_options)

    return declare
