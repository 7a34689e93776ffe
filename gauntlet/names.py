"""Names as MLflow accepts them: metric keys, tag keys and params share one alphabet (no commas).

lm-eval names a filtered metric ``exact_match,strict-match``; MLflow refuses the comma. Every place that
writes a score, a gate rule or a leaderboard column to MLflow goes through :func:`mlflow_name`, so a
score written by the evaluation stage is found again under the same key by the gate and the registry.
"""

from __future__ import annotations

import re

MAX_LENGTH = 250
# registry version tags that more than one module reads: the training objective (sft, dpo, …; the board's
# objective column) and the prefix of a registered starting model's own lineage (gauntlet.models.registry_lineage)
OBJECTIVE_TAG = "train.objective"
START_TAG = "start_model."
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_name(*parts: str) -> str:
    """``parts`` joined with dots, each character MLflow does not allow replaced by ``_``."""
    return _NOT_ALLOWED.sub("_", ".".join(parts))[:MAX_LENGTH]


def metric_key(task: str, metric: str) -> str:
    """A task's metric as an MLflow key: ``gsm8k.exact_match/strict-match`` (lm-eval's comma becomes a slash)."""
    return mlflow_name(task, metric.replace(",", "/"))


def task_result_metrics(result) -> dict[str, float]:
    """A task's scores (a :class:`~gauntlet.refs.TaskResult`) as MLflow metrics: every metric and its stderr,
    and the normalized score."""
    out: dict[str, float] = {}
    for s in result.scores:
        out[metric_key(s.task, s.metric)] = s.value
        if s.stderr is not None:
            out[metric_key(s.task, s.metric + "_stderr")] = s.stderr
    if result.normalized is not None:
        out[metric_key(result.task, "normalized")] = result.normalized
    return out
