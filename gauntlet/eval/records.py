"""What lm-eval returned, as Gauntlet's records: scores per task and metric with their intervals, the task
names of the report, the random baseline, the settings lm-eval applied, and per-item answers. No Prefect,
no model: pure functions over lm-eval's results and samples (engine.run_task calls them).
"""

from __future__ import annotations

import json
import math
from typing import Any

from gauntlet.eval.suites import FIXTURE_PREFIX, EvalTaskPlan
from gauntlet.refs import TaskScore


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            x = float(x)  # numpy scalars
        except (TypeError, ValueError):
            return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def scores_from_results(results: dict) -> list[TaskScore]:
    """One TaskScore per task per metric of lm-eval's ``results``; stderr None where lm-eval says N/A.

    A metric under a filter other than ``none`` is named ``metric,filter`` (as lm-eval prints it).
    """
    scores = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, raw in metrics.items():
            if "," not in key or "_stderr," in key:
                continue  # alias, samples, … and the stderr entries themselves
            metric, _, filt = key.partition(",")
            value = _number(raw)
            if value is None:
                continue
            stderr = _number(metrics.get(f"{metric}_stderr,{filt}"))
            name = metric if filt == "none" else f"{metric},{filt}"
            scores.append(TaskScore(task=task, metric=name, value=value, stderr=stderr))
    return scores


def report_name(plan: EvalTaskPlan, engine_name: str) -> str:
    """A task name as the report shows it: the plan's name for the task itself, and subtasks as the
    real task calls them (a fixture's prefix dropped), so fixture and real reports line up."""
    if engine_name == plan.engine_task:
        return plan.name
    if plan.source == "fixture" and engine_name.startswith(FIXTURE_PREFIX):
        return engine_name[len(FIXTURE_PREFIX):]
    return engine_name


def chance_of(plan: EvalTaskPlan, raw: dict, samples: dict[str, list[dict]]) -> tuple[float, str]:
    """The task's random baseline and where it comes from: the declared one (suites.yaml or the task YAML's
    ``metadata.random_baseline``), else measured from the items scored: 1/number of choices for a
    multiple-choice item, 0 for a generated one, averaged over every item of the task and its subtasks."""
    if plan.random_baseline is not None:
        return plan.random_baseline, "declared"
    configs = raw.get("configs") or {}
    chances = [1.0 / len(row["arguments"]) if configs.get(task, {}).get("output_type") == "multiple_choice"
               and row.get("arguments") else 0.0
               for task, rows in samples.items() for row in rows]
    if not chances:
        return 0.0, "no items scored: chance taken as 0"
    if not any(chances):
        return 0.0, "generated answers: chance is 0"
    return math.fsum(chances) / len(chances), f"mean of 1/choices over {len(chances)} items"


def effective_settings(raw: dict, plan: EvalTaskPlan) -> dict[str, dict[str, Any]]:
    """Per leaf task, the settings lm-eval actually applied: few-shot count, generation kwargs, filters and
    metrics (the task YAML's own unless the run config set them)."""
    out = {}
    for task, cfg in sorted((raw.get("configs") or {}).items()):
        entry: dict[str, Any] = {"num_fewshot": cfg.get("num_fewshot"), "output_type": cfg.get("output_type")}
        if cfg.get("output_type") == "generate_until":
            entry["generation_kwargs"] = cfg.get("generation_kwargs")
        entry["filters"] = [f.get("name") for f in cfg.get("filter_list") or [] if isinstance(f, dict)] or ["none"]
        entry["metrics"] = [m.get("metric") for m in cfg.get("metric_list") or [] if isinstance(m, dict)]
        out[report_name(plan, task)] = entry
    return out


def leaves_of(raw: dict, task: str) -> set[str]:
    """The leaf tasks under ``task`` (itself when it is a leaf), from lm-eval's ``group_subtasks``."""
    groups = raw.get("group_subtasks") or {}
    pending, leaves = [task], set()
    while pending:
        name = pending.pop()
        if groups.get(name):
            pending += groups[name]
        else:
            leaves.add(name)
    return leaves


def with_intervals(scores: list[TaskScore], items: dict[str, dict[str, float]], raw: dict,
                   plan: EvalTaskPlan) -> list[TaskScore]:
    """Each score with its 95% interval and item count, from the items of its task (a group: all its leaves')."""
    from gauntlet.eval.stats import interval

    out = []
    for s in scores:
        engine_name = plan.engine_task if s.task == plan.name else s.task
        leaves = {report_name(plan, t) for t in leaves_of(raw, engine_name)} | {s.task}
        values = [v for k, v in items.get(s.metric, {}).items() if k.rpartition("/")[0] in leaves]
        if values:
            ci = interval(values)
            s = s.model_copy(update={"ci_low": ci.lo, "ci_high": ci.hi, "n": ci.n,
                                     "stderr": s.stderr if s.stderr is not None else ci.stderr})
        out.append(s)
    return out


def answer_of(row: dict) -> str:
    return json.dumps(jsonable(row.get("filtered_resps")), sort_keys=True)


def changed_answers(repeats: list[dict[str, list[dict]]]) -> list[str]:
    """Items (``task/doc_id``) whose filtered answer differs between repeats (each repeat: task → sample rows)."""
    first, rest = repeats[0], repeats[1:]
    return sorted({f"{task}/{row['doc_id']}" for task, rows in first.items() for i, row in enumerate(rows)
                   if any(answer_of(other[task][i]) != answer_of(row) for other in rest)})
