"""One task scored through lm-evaluation-harness on an :class:`~gauntlet.eval.engine.Engine`.

:func:`run_task` runs one :class:`~gauntlet.eval.suites.EvalTaskPlan` through ``lm_eval.simple_evaluate`` with
the protocol's settings, once per repeat seed and within ``eval.timeout_minutes``, writes lm-eval's results and
samples, and turns them into a :class:`~gauntlet.refs.TaskResult` (``tasks/score.py`` is its cached stage). Local
task configs (fixtures, the user's own tasks) come from :mod:`gauntlet.eval.taskconfig`. No Prefect here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gauntlet.config.eval import EvalSpec
from gauntlet.eval.endpoint import usage_mark, usage_since
from gauntlet.eval.engine import BOOTSTRAP_ITERS, Engine, offline
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
from gauntlet.refs import TaskResult, TaskScore, TokenUsage

log = logging.getLogger(__name__)
__all__ = ["EvalTimeout", "run_task"]


# ---------------------------------------------------------------------------------------------
# time limit
# ---------------------------------------------------------------------------------------------

# Where lm-eval's backends run the model: every batch of the hf backend (log-likelihood and generation) and
# of vLLM goes through one of these, and every request of the API backends one at a time (num_concurrent 1).
MODEL_CALLS = ("_model_call", "_model_generate", "model_call")


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


def generation_overrides(spec: EvalSpec, plan: EvalTaskPlan) -> dict[str, Any] | None:
    """What the run config sets explicitly over the task's own ``generation_kwargs`` (None: nothing, the
    task's own hold): the generation budget, and the temperature when ``eval.temperature`` is set."""
    kwargs: dict[str, Any] = {}
    if plan.max_gen_tokens is not None:
        kwargs["max_gen_toks"] = plan.max_gen_tokens
    if spec.temperature is not None:
        kwargs.update(temperature=spec.temperature, do_sample=spec.temperature > 0)
    return kwargs or None


def repeat_seeds(spec: EvalSpec) -> list[int]:
    """The sampling seed of each repeat (``eval.repeats``); the few-shot seed stays the same in all."""
    return [spec.fewshot_seed + i for i in range(spec.repeats)]


@dataclass
class TaskRuns:
    """lm-eval's outputs for one task, one per repeat (each with its own sampling seed)."""

    plan: EvalTaskPlan
    seeds: list[int]
    gen_kwargs: dict[str, Any] | None
    results: list[dict] = field(default_factory=list)          # lm-eval's results, samples taken out
    engine_samples: list[dict] = field(default_factory=list)   # per repeat: lm-eval's task name -> sample rows
    seconds: float = 0.0
    usage: TokenUsage | None = None                             # an endpoint's tokens (None: local weights)

    def add(self, results: dict) -> None:
        self.engine_samples.append(results.pop("samples", None) or {})
        self.results.append(results)

    def samples(self) -> list[dict[str, list[dict]]]:
        """Per repeat: the report's task name -> sample rows."""
        return [{report_name(self.plan, t): rows for t, rows in samples.items()} for samples in self.engine_samples]

    @property
    def repeated(self) -> bool:
        return len(self.seeds) > 1


def run_task(spec: EvalSpec, plan: EvalTaskPlan, engine: Engine, eval_data_path: str | None,
             out_dir: Path) -> TaskResult:
    """Evaluate one planned task with the spec's protocol; lm-eval's outputs go to ``out_dir``.

    The task's own settings (few-shot count, generation kwargs, filters, metrics) hold unless the plan
    sets them (see :func:`gauntlet.eval.suites.plan_tasks`); what lm-eval applied is recorded per task.
    With ``eval.repeats`` > 1 the task runs once per seed: scores are the mean over repeats, items are
    averaged over repeats, and under greedy decoding any item whose answer changed is listed. Three steps:
    the repeats (:func:`run_repeats`), lm-eval's files (:func:`write_task_files`) and the aggregate
    (:func:`aggregate`).
    """
    runs = run_repeats(spec, plan, engine, eval_data_path)
    results_path, samples_path = write_task_files(runs, Path(out_dir))
    return aggregate(runs, results_path, samples_path)


def run_repeats(spec: EvalSpec, plan: EvalTaskPlan, engine: Engine, eval_data_path: str | None) -> TaskRuns:
    """The task through lm-eval once per repeat seed, within ``eval.timeout_minutes`` for all of them."""
    runs = TaskRuns(plan=plan, seeds=repeat_seeds(spec), gen_kwargs=generation_overrides(spec, plan))
    # One evaluation at a time per process: the shared task index holds this run's resolved data paths.
    with INDEX_LOCK, offline(plan.source != "engine"):
        manager = task_manager_for(plan, tasks_dir_of(spec), eval_data_path)  # bad task or data: before loading
        lm = engine.lm
        log.info("lm-eval: %s (%s, %s) %s-shot, limit %s, generation %s%s", plan.name, plan.engine_task,
                 plan.source, "task's own" if plan.num_fewshot is None else plan.num_fewshot, plan.limit,
                 runs.gen_kwargs or "task's own", f", {len(runs.seeds)} repeats" if runs.repeated else "")
        t0 = time.perf_counter()
        limit = spec.timeout_minutes
        stopped = f"score stage ({plan.name}): stopped after eval.timeout_minutes={limit:g}" if limit else ""
        mark = usage_mark(lm)
        for seed in runs.seeds:
            with time_limit(lm, limit * 60 - (time.perf_counter() - t0) if limit else None, stopped):
                runs.add(evaluate_once(spec, plan, lm, manager, runs.gen_kwargs, seed))
        runs.usage = usage_since(lm, mark, spec)
    runs.seconds = time.perf_counter() - t0
    log.info("lm-eval: %s finished in %.1fs", plan.name, runs.seconds)
    return runs


def evaluate_once(spec: EvalSpec, plan: EvalTaskPlan, lm: Any, manager: Any, gen_kwargs: dict[str, Any] | None,
                  seed: int) -> dict:
    """One ``lm_eval.simple_evaluate`` of the task with ``seed`` for sampling (the few-shot seed fixed);
    its failures as EvalError naming the task."""
    import lm_eval

    try:
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
    return results


def write_task_files(runs: TaskRuns, out_dir: Path) -> tuple[Path, Path]:
    """lm-eval's samples of every repeat (one JSON line per item, with its repeat and seed when repeated) and
    its results (the first repeat's; the others beside it as ``.rN``). Returns (results, samples) paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path = out_dir / "lm_eval_samples.jsonl"
    lines = [json.dumps(jsonable({"task": task, **({"repeat": i, "seed": runs.seeds[i]} if runs.repeated else {}),
                                  **row}), ensure_ascii=False)
             for i, samples in enumerate(runs.samples()) for task, rows in samples.items() for row in rows]
    write_text(samples_path, "".join(line + "\n" for line in lines))
    raws = [jsonable(r) for r in runs.results]
    results_path = out_dir / "lm_eval_results.json"
    write_json(results_path, raws[0], sort_keys=True, ensure_ascii=False)
    for repeat, other in enumerate(raws[1:], start=1):
        write_json(out_dir / f"lm_eval_results.r{repeat}.json", other, sort_keys=True, ensure_ascii=False)
    return results_path, samples_path


def repeat_scores(runs: TaskRuns, raws: list[dict]) -> tuple[list[list[TaskScore]], list[TaskScore]]:
    """Every repeat's scores under the report's task names, and the task's scores: the first repeat's, or the
    mean over repeats (their interval then comes from the items averaged over repeats)."""
    import statistics

    per_repeat = [[s.model_copy(update={"task": report_name(runs.plan, s.task)}) for s in scores_from_results(r)]
                  for r in raws]
    scores = per_repeat[0]
    if runs.repeated:
        scores = [s.model_copy(update={"value": statistics.fmean(
                      o.value for rep in per_repeat for o in rep if (o.task, o.metric) == (s.task, s.metric)),
                      "stderr": None}) for s in scores]
    return per_repeat, scores


def primary_score(plan: EvalTaskPlan, scores: list[TaskScore]) -> TaskScore:
    """The score the plan reports (its task and metric); EvalError naming what lm-eval reported instead."""
    primary = next((s for s in scores if s.task == plan.name and s.metric == plan.metric), None)
    if primary is None:
        reported = sorted({s.metric for s in scores if s.task == plan.name})
        raise EvalError(f"eval task {plan.name!r}: lm-eval reported no {plan.metric!r} for {plan.engine_task!r} "
                        f"(it reported {reported}); fix 'metric' in suites.yaml")
    for s in scores:
        if s.task == plan.name:
            log.info("  %s %s = %.4f%s", s.task, s.metric, s.value, "" if s.ci_low is None else
                     f" (95% CI {s.ci_low:.4f}…{s.ci_high:.4f}, n={s.n})")
    return primary


def aggregate(runs: TaskRuns, results_path: Path, samples_path: Path) -> TaskResult:
    """The task's result: scores with intervals (per item, averaged over repeats), the primary score and its
    normalization against the random baseline, the repeats' values and any greedy answer that changed."""
    import statistics

    from gauntlet.eval.stats import item_scores

    plan, raws, all_samples = runs.plan, [jsonable(r) for r in runs.results], runs.samples()
    raw = raws[0]
    per_item = [item_scores(samples) for samples in all_samples]
    items = {metric: {k: statistics.fmean(rep[metric][k] for rep in per_item if k in rep.get(metric, {}))
                      for k in values} for metric, values in per_item[0].items()}
    per_repeat, scores = repeat_scores(runs, raws)
    scores = with_intervals(scores, items, raw, plan)
    primary = primary_score(plan, scores)
    repeat_values = [next(o.value for o in rep if (o.task, o.metric) == (plan.name, plan.metric))
                     for rep in per_repeat] if runs.repeated else []
    greedy = not (runs.gen_kwargs or {}).get("do_sample")
    changed = changed_answers(all_samples) if runs.repeated and greedy else []
    if changed:
        log.warning("eval task %s: %d item(s) answered differently across greedy repeats (not deterministic): %s",
                    plan.name, len(changed), changed[:10])
    baseline, baseline_source = chance_of(plan, runs.results[0], runs.engine_samples[0])
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
        seconds=runs.seconds, item_scores=items, effective=effective, repeat_values=repeat_values,
        repeat_seeds=runs.seeds if runs.repeated else [], changed_items=changed,
        results_path=str(results_path), samples_path=str(samples_path), usage=runs.usage,
    )
