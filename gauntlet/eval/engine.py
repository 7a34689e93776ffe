"""The evaluation engine: lm-evaluation-harness on a loaded model, one task (or group) per call.

:class:`Engine` holds one model loaded by lm-eval's ``hf`` or ``vllm`` backend, loaded on first use and
shared by every task of an evaluation (and by the speed probe): a fully cached evaluation never
loads the model at all. :func:`run_task` runs one :class:`~gauntlet.eval.suites.EvalTaskPlan` through
``lm_eval.simple_evaluate`` with the protocol's settings and turns lm-eval's results into a
:class:`~gauntlet.refs.TaskResult`.

Local task configs (fixtures, the user's own tasks) come from :mod:`gauntlet.eval.taskconfig`. No Prefect here.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterator

from gauntlet.eval.records import (
    chance_of,
    changed_answers,
    effective_settings,
    jsonable,
    report_name,
    scores_from_results,
    with_intervals,
)
from gauntlet.eval.suites import EvalTaskPlan, normalized_score, tasks_dir_of
from gauntlet.eval.taskconfig import INDEX_LOCK, EvalError, task_manager_for
from gauntlet.files import write_json, write_text
from gauntlet.hashing import sha256_json
from gauntlet.refs import ModelRef, TaskResult

log = logging.getLogger(__name__)

# Stderr of mean-aggregated metrics (acc, exact_match) is closed-form; other aggregations bootstrap.
BOOTSTRAP_ITERS = 1000
GPU_EXTRA_HINT = "install the GPU extra (pip install 'llm-gauntlet[gpu]') or set eval.backend: hf"
__all__ = ["EvalError", "EvalTimeout", "Engine", "engine_for", "run_task"]   # EvalError: where callers have always found it


# ---------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------


def pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_for(device: str) -> str:
    return "float32" if device == "cpu" else "auto"


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """No hub traffic while it holds (models are local; fixture and local task data too).

    The hub libraries read these variables once, when imported: they are imported first, so that
    an offline section never leaves a later section (real datasets) offline for the whole process.
    """
    import datasets  # noqa: F401
    import huggingface_hub  # noqa: F401

    keys = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"} if enabled else {}
    keys.update({"HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"})
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------


def engine_model_args(spec: Any, model_path: str, device: str) -> tuple[str, dict[str, Any]]:
    """(lm-eval model type, its model_args) for the configured backend: what the engine is handed."""
    if spec.backend == "vllm":
        args: dict[str, Any] = {
            "pretrained": model_path,
            "dtype": "auto",
            "tensor_parallel_size": spec.tensor_parallel_size,
            "gpu_memory_utilization": spec.gpu_memory_utilization,
            "seed": spec.fewshot_seed,
            "batch_size": spec.batch_size,
        }
        if spec.max_model_len is not None:
            args["max_model_len"] = spec.max_model_len
        return "vllm", args
    return "hf", {"pretrained": model_path, "dtype": dtype_for(device)}


def check_backend(spec: Any, device: str) -> None:
    """A clear error, before anything loads, when the backend cannot run here."""
    if spec.backend != "vllm":
        return
    if find_spec("vllm") is None:
        raise EvalError(f"eval.backend is 'vllm' but the vllm package is not installed; {GPU_EXTRA_HINT}")
    if device != "cuda":
        raise EvalError(f"eval.backend is 'vllm', which needs a CUDA GPU, and none is visible here; {GPU_EXTRA_HINT}")
    import torch

    if spec.tensor_parallel_size > torch.cuda.device_count():
        raise EvalError(f"eval.tensor_parallel_size is {spec.tensor_parallel_size} but only "
                        f"{torch.cuda.device_count()} GPU(s) are visible; lower it to at most that")


class Engine:
    """One model on one backend, loaded on first use (``lm``) and shared until :meth:`close`."""

    def __init__(self, spec: Any, model: ModelRef, device: str | None = None):
        self.spec, self.model = spec, model
        self.device = device or device_kind()
        self.backend, self.model_args = engine_model_args(spec, model.path, self.device)
        self._lm = None
        self.loads = 0

    @property
    def loaded(self) -> bool:
        return self._lm is not None

    @property
    def lm(self):
        if self._lm is None:
            check_backend(self.spec, self.device)
            if not Path(self.model.path).exists():
                raise EvalError(f"model {self.model.name}: path {self.model.path} does not exist")
            from lm_eval.api.registry import get_model

            log.info("loading %s (%s) with lm-eval's %s backend on %s: %s", self.model.name, self.model.path,
                     self.backend, self.device, self.model_args)
            t0 = time.perf_counter()
            try:
                with offline(False):  # the model is a local folder by now
                    self._lm = get_model(self.backend).create_from_arg_obj(
                        dict(self.model_args),
                        {"batch_size": self.spec.batch_size, "max_batch_size": None, "device": self.device})
            except Exception as e:
                raise EvalError(f"model {self.model.name} ({self.model.path}) failed to load with the "
                                f"{self.backend} backend: {type(e).__name__}: {e}") from e
            self.loads += 1
            log.info("model loaded in %.1fs", time.perf_counter() - t0)
        return self._lm

    def close(self) -> None:
        if self._lm is None:
            return
        self._lm = None
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()


_ACTIVE: dict[str, Engine] = {}
_ACTIVE_LOCK = threading.Lock()


@contextlib.contextmanager
def engine_for(spec: Any, model: ModelRef) -> Iterator[Engine]:
    """The engine for this model and backend: the one an enclosing ``engine_for`` opened, else a new one
    (closed on exit). The evaluate stage opens one around all its tasks and the speed probe."""
    device = device_kind()
    key = sha256_json([model.path, model.sha, engine_model_args(spec, model.path, device), spec.batch_size])
    with _ACTIVE_LOCK:
        shared = _ACTIVE.get(key)
        if shared is None:
            shared = _ACTIVE[key] = Engine(spec, model, device)
            owner = True
        else:
            owner = False
    try:
        yield shared
    finally:
        if owner:
            with _ACTIVE_LOCK:
                _ACTIVE.pop(key, None)
            shared.close()


# ---------------------------------------------------------------------------------------------
# time limit
# ---------------------------------------------------------------------------------------------

# Where lm-eval's backends run the model: every batch of the hf backend (log-likelihood and generation) and
# of vLLM goes through one of these.
MODEL_CALLS = ("_model_call", "_model_generate")


class EvalTimeout(EvalError):
    """A task's scoring ran past ``eval.timeout_minutes``."""


@contextlib.contextmanager
def time_limit(lm: Any, seconds: float | None, what: str) -> Iterator[None]:
    """Raise :class:`EvalTimeout`, saying ``what`` stopped, at the first model batch that starts more than
    ``seconds`` after entering (None: no limit).

    The evaluation runs in this process, so there is nothing to kill: the limit is checked before each batch
    the model runs, which stops a long or stuck evaluation within one batch of the limit. A single model
    call that never returns is not interrupted (see docs/reliability.md).
    """
    if seconds is None:
        yield
        return
    started = time.monotonic()
    wrapped = []
    for name in MODEL_CALLS:
        method = getattr(lm, name, None)
        if method is None or name in vars(lm):
            continue

        def checked(*args, _method=method, **kwargs):
            if time.monotonic() - started > seconds:
                raise EvalTimeout(f"{what} (stopped {time.monotonic() - started:.1f}s in, before its next "
                                  f"model batch)")
            return _method(*args, **kwargs)
        setattr(lm, name, checked)   # on the instance: removing it brings back the class's method
        wrapped.append(name)
    try:
        yield
    finally:
        for name in wrapped:
            vars(lm).pop(name, None)


# ---------------------------------------------------------------------------------------------
# one task
# ---------------------------------------------------------------------------------------------


def generation_overrides(spec: Any, plan: EvalTaskPlan) -> dict[str, Any] | None:
    """What the run config sets explicitly over the task's own ``generation_kwargs`` (None: nothing, the
    task's own hold): the generation budget, and the temperature when ``eval.temperature`` is set."""
    kwargs: dict[str, Any] = {}
    if plan.max_gen_tokens is not None:
        kwargs["max_gen_toks"] = plan.max_gen_tokens
    if getattr(spec, "temperature", None) is not None:
        kwargs.update(temperature=spec.temperature, do_sample=spec.temperature > 0)
    return kwargs or None


def repeat_seeds(spec: Any) -> list[int]:
    """The sampling seed of each repeat (``eval.repeats``); the few-shot seed stays the same in all."""
    return [spec.fewshot_seed + i for i in range(getattr(spec, "repeats", 1))]


def run_task(spec: Any, plan: EvalTaskPlan, engine: Engine, eval_data_path: str | None, out_dir: Path) -> TaskResult:
    """Evaluate one planned task with the spec's protocol; lm-eval's outputs go to ``out_dir``.

    The task's own settings (few-shot count, generation kwargs, filters, metrics) hold unless the plan
    sets them (see :func:`gauntlet.eval.suites.plan_tasks`); what lm-eval applied is recorded per task.
    With ``eval.repeats`` > 1 the task runs once per seed: scores are the mean over repeats, items are
    averaged over repeats, and under greedy decoding any item whose answer changed is listed.
    """
    import statistics

    import lm_eval

    from gauntlet.eval.stats import item_scores

    out_dir = Path(out_dir)
    gen_kwargs = generation_overrides(spec, plan)
    seeds = repeat_seeds(spec)
    runs: list[dict] = []
    # One evaluation at a time per process: the shared task index holds this run's resolved data paths.
    with INDEX_LOCK, offline(plan.source != "engine"):
        manager = task_manager_for(plan, tasks_dir_of(spec), eval_data_path)  # bad task or data: before loading
        lm = engine.lm
        log.info("lm-eval: %s (%s, %s) %s-shot, limit %s, generation %s%s", plan.name, plan.engine_task,
                 plan.source, "task's own" if plan.num_fewshot is None else plan.num_fewshot, plan.limit,
                 gen_kwargs or "task's own", f", {len(seeds)} repeats" if len(seeds) > 1 else "")
        t0 = time.perf_counter()
        limit = getattr(spec, "timeout_minutes", None)
        stopped = f"score stage ({plan.name}): stopped after eval.timeout_minutes={limit:g}" if limit else ""
        for seed in seeds:
            try:
                with time_limit(lm, limit * 60 - (time.perf_counter() - t0) if limit else None, stopped):
                    results = lm_eval.simple_evaluate(
                        model=lm,
                        tasks=[plan.engine_task],
                        num_fewshot=plan.num_fewshot,
                        limit=plan.limit,
                        bootstrap_iters=BOOTSTRAP_ITERS,
                        log_samples=True,
                        apply_chat_template=spec.apply_chat_template,
                        fewshot_as_multiturn=spec.apply_chat_template,
                        gen_kwargs=dict(gen_kwargs) if gen_kwargs else None,
                        task_manager=manager,
                        random_seed=seed,
                        numpy_random_seed=seed,
                        torch_random_seed=seed,
                        fewshot_random_seed=spec.fewshot_seed,
                    )
            except EvalError:
                raise
            except KeyError as e:
                raise EvalError(f"eval task {plan.name!r}: lm-eval does not know {plan.engine_task!r}: {e}") from e
            except Exception as e:  # say which task failed; the cause stays chained
                raise EvalError(f"eval task {plan.name!r} ({plan.engine_task}) failed in lm-eval: "
                                f"{type(e).__name__}: {e}") from e
            if results is None:
                raise EvalError("lm-eval returned no results (not the main process?)")
            runs.append(results)
    seconds = time.perf_counter() - t0
    log.info("lm-eval: %s finished in %.1fs", plan.name, seconds)

    out_dir.mkdir(parents=True, exist_ok=True)
    engine_samples = [r.pop("samples", None) or {} for r in runs]
    all_samples = [{report_name(plan, t): rows for t, rows in samples.items()} for samples in engine_samples]
    baseline, baseline_source = chance_of(plan, runs[0], engine_samples[0])
    samples_path = out_dir / "lm_eval_samples.jsonl"
    lines = [json.dumps(jsonable({"task": task, **({"repeat": repeat, "seed": seeds[repeat]} if len(seeds) > 1 else {}),
                                  **row}), ensure_ascii=False)
             for repeat, samples in enumerate(all_samples) for task, rows in samples.items() for row in rows]
    write_text(samples_path, "".join(line + "\n" for line in lines))
    raws = [jsonable(r) for r in runs]
    raw = raws[0]
    results_path = out_dir / "lm_eval_results.json"
    write_json(results_path, raw, sort_keys=True, ensure_ascii=False)
    for repeat, other in enumerate(raws[1:], start=1):
        write_json(out_dir / f"lm_eval_results.r{repeat}.json", other, sort_keys=True, ensure_ascii=False)

    per_repeat = [item_scores(samples) for samples in all_samples]
    items = {metric: {k: statistics.fmean(rep[metric][k] for rep in per_repeat if k in rep.get(metric, {}))
                      for k in values} for metric, values in per_repeat[0].items()}
    repeat_scores = [[s.model_copy(update={"task": report_name(plan, s.task)}) for s in scores_from_results(r)]
                     for r in raws]
    scores = repeat_scores[0]
    if len(raws) > 1:  # the mean over repeats; the interval comes from the items averaged over repeats
        scores = [s.model_copy(update={"value": statistics.fmean(
                      o.value for rep in repeat_scores for o in rep if (o.task, o.metric) == (s.task, s.metric)),
                      "stderr": None}) for s in scores]
    scores = with_intervals(scores, items, raw, plan)
    primary = next((s for s in scores if s.task == plan.name and s.metric == plan.metric), None)
    if primary is None:
        reported = sorted({s.metric for s in scores if s.task == plan.name})
        raise EvalError(f"eval task {plan.name!r}: lm-eval reported no {plan.metric!r} for {plan.engine_task!r} "
                        f"(it reported {reported}); fix 'metric' in suites.yaml")
    for s in scores:
        if s.task == plan.name:
            log.info("  %s %s = %.4f%s", s.task, s.metric, s.value, "" if s.ci_low is None else
                     f" (95% CI {s.ci_low:.4f}…{s.ci_high:.4f}, n={s.n})")
    repeat_values = [next(o.value for o in rep if (o.task, o.metric) == (plan.name, plan.metric))
                     for rep in repeat_scores] if len(raws) > 1 else []
    greedy = not (gen_kwargs or {}).get("do_sample")
    changed = changed_answers(all_samples) if len(raws) > 1 and greedy else []
    if changed:
        log.warning("eval task %s: %d item(s) answered differently across greedy repeats (not deterministic): %s",
                    plan.name, len(changed), changed[:10])
    effective = effective_settings(raw, plan)
    shots = {e["num_fewshot"] for e in effective.values() if e.get("num_fewshot") is not None}
    return TaskResult(
        task=plan.name, engine_task=plan.engine_task, source=plan.source, metric=plan.metric,
        value=primary.value, stderr=primary.stderr, random_baseline=baseline, random_baseline_source=baseline_source,
        normalized=normalized_score(primary.value, baseline),
        scores=scores,
        versions={report_name(plan, t): str(v) for t, v in (raw.get("versions") or {}).items()},
        num_fewshot=max(shots) if shots else (plan.num_fewshot or 0), limit=plan.limit,
        n_samples={report_name(plan, t): int(n.get("effective", 0)) for t, n in (raw.get("n-samples") or {}).items()},
        seconds=seconds, item_scores=items, effective=effective, repeat_values=repeat_values,
        repeat_seeds=seeds if len(seeds) > 1 else [], changed_items=changed,
        results_path=str(results_path), samples_path=str(samples_path),
    )
