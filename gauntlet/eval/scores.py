"""Where a score is read: a task's score in a report under a metric name, with what every reader needs.

The gate, the leaderboard (its columns and its bootstrap), the run's summary and the notifications read a
score through :func:`read` (or :func:`find`, which says None instead of why). A name resolves one way
everywhere (:meth:`gauntlet.refs.EvalReport.resolve`): the exact name, else a name without a filter
(``exact_match``) finds the task's only filtered score of that metric (``exact_match,last-number``); a
name that fits several filters is refused, naming them. What comes back is the score with its interval,
its per-item records (what paired tests compare) and its value normalised against the random baseline
the task's own evaluation used (:func:`gauntlet.eval.suites.normalized_score`). No Prefect, no MLflow.
"""

from __future__ import annotations

from gauntlet.eval.suites import normalized_score
from gauntlet.names import metric_key
from gauntlet.refs import EvalReport, MetricLookupError, TaskScore


class Score(TaskScore):
    """A resolved score: ``metric`` is the name in the report (``exact_match,last-number``)."""

    items: dict[str, float] = {}            # "task/doc_id" -> item score; empty: the report kept no records
    random_baseline: float | None = None    # the task's (None: a subtask, or a report without task results)

    @property
    def normalized(self) -> float | None:
        """0 at the random baseline (and below), 100 at a perfect score; None without a baseline."""
        return self.normalize(self.value)

    def normalize(self, value: float) -> float | None:
        """``value`` (this score's, or a resample of it) on the normalised scale."""
        return None if self.random_baseline is None else normalized_score(value, self.random_baseline)

    def interval_text(self) -> str:
        """`` (95% CI 0.4100…0.6300)``, or nothing when the score has no interval."""
        if self.ci_low is None or self.ci_high is None:
            return ""
        return f" (95% CI {self.ci_low:.4f}…{self.ci_high:.4f})"


def read(report: EvalReport, task: str, metric: str) -> Score:
    """The task's score under ``metric``; :class:`~gauntlet.refs.MetricLookupError` when there is none
    or the name fits several (its ``explain(setting)`` says which, and what to set)."""
    found = report.resolve(task, metric)
    result = report.result(task)
    return Score(**found.model_dump(), items=(result.item_scores.get(found.metric) or {}) if result else {},
                 random_baseline=result.random_baseline if result else None)


def find(report: EvalReport | None, task: str, metric: str) -> Score | None:
    """:func:`read`, or None (no report, no such score, or an ambiguous name) where a reader shows a gap."""
    if report is None:
        return None
    try:
        return read(report, task, metric)
    except MetricLookupError:
        return None


def evaluated_tasks(report: EvalReport) -> list[str]:
    """The tasks a report was evaluated on: one per task result (a group such as MMLU, not its 57 subtasks);
    every task of its scores when it lists no task results (hand-made or older reports)."""
    if report.task_results:
        return [r.task for r in report.task_results]
    return list(dict.fromkeys(s.task for s in report.scores))


def tagged_score(tagged: dict[str, float], score: TaskScore) -> float | None:
    """``score``'s task and metric as a registered version's score tags hold it (keys by
    :func:`gauntlet.names.metric_key`, as :func:`gauntlet.registry.candidates.candidate_tags` writes them)."""
    return tagged.get(metric_key(score.task, score.metric))
