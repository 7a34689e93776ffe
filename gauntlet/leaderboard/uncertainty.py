"""How sure the board is: an interval on every ranked score and rank ranges for rows that are
statistically indistinguishable.

Every ranked report was measured with one protocol, so the models answered the same items. One paired
bootstrap serves the whole board: each resample draws the items of every task once (with replacement) and
recomputes every model's normalised task scores and the ranking key (average, suite mean or task score) on
the same draw, so what items cost every model alike cancels out of their differences. A row's interval is
the 2.5–97.5% range of its resampled key; a row is significantly ahead of another when the 95% interval of
their paired difference leaves out 0. Rank range: from 1 + the rows significantly ahead of it to the
ranked count − the rows significantly behind it ("2–3": it could be second or third).

A report without per-item records (older reports) is resampled from its standard error alone (a normal
draw, not paired): its interval is honest, its comparisons a little too cautious. No Prefect, no MLflow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gauntlet.eval.scores import find
from gauntlet.eval.stats import BOOTSTRAP_SEED, CONFIDENCE
from gauntlet.refs import EvalReport

if TYPE_CHECKING:
    from gauntlet.leaderboard.board import BoardRow

BOOTSTRAP_SAMPLES = 2000


def task_draws(reports: dict[str, EvalReport], task: str, metric: str, seed: int):
    """Row key → resampled normalised scores of ``task`` (numpy, BOOTSTRAP_SAMPLES long), paired over the
    items every report answered; rows without records drawn from their standard error."""
    import numpy as np

    rng = np.random.default_rng(seed)
    scores = {k: s for k, r in reports.items() if (s := find(r, task, metric)) is not None
              and s.random_baseline is not None}   # as the board's columns read them
    items = [set(s.items) for s in scores.values() if s.items]
    common = sorted(set.intersection(*items)) if items else []
    index = rng.integers(0, len(common), size=(BOOTSTRAP_SAMPLES, len(common))) if common else None
    out = {}
    for key, score in scores.items():
        if score.items and index is not None:
            values = np.asarray([score.items[k] for k in common])[index].mean(axis=1)
        else:
            values = rng.normal(score.value, score.stderr or 0.0, size=BOOTSTRAP_SAMPLES)
        out[key] = np.fromiter((score.normalize(v) for v in values), float, len(values))
    return out


def key_tasks(rank_key: str, tasks: list[str], suites: dict[str, list[str]]) -> list[str] | None:
    """The tasks the ranking key averages (None: a speed key, which has no item-level uncertainty)."""
    if rank_key == "average":
        return tasks
    if rank_key.startswith("suite:"):
        return suites.get(rank_key[len("suite:"):])
    if rank_key.startswith("task:"):
        return [rank_key[len("task:"):]]
    return None


def add_uncertainty(rows: list[BoardRow], reports: dict[str, EvalReport], rank_key: str, tasks: list[str],
                    suites: dict[str, list[str]], metric_of) -> None:
    """Fill each ranked row's task intervals, key interval and rank range (rows already ranked, in order)."""
    import numpy as np

    ranked = [r for r in rows if r.rank is not None and r.key in reports]
    if not ranked:
        return
    by_key = {r.key: reports[r.key] for r in ranked}
    draws = {t: task_draws(by_key, t, metric_of(t), BOOTSTRAP_SEED + i) for i, t in enumerate(tasks)}
    lo_q, hi_q = (1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2
    for r in ranked:
        for t in tasks:
            d = draws[t].get(r.key)
            r.intervals[t] = None if d is None else (float(np.quantile(d, lo_q)), float(np.quantile(d, hi_q)))
    members = key_tasks(rank_key, tasks, suites)
    if not members:
        return  # speed keys: ranks stay as measured (ties at the displayed precision)
    key_draws = {r.key: np.mean([draws[t][r.key] for t in members], axis=0)
                 for r in ranked if all(r.key in draws[t] for t in members)}
    for r in ranked:
        if r.key in key_draws:
            r.ci_low, r.ci_high = (float(q) for q in np.quantile(key_draws[r.key], [lo_q, hi_q]))
    keys = list(key_draws)
    ahead = {k: 0 for k in keys}
    behind = {k: 0 for k in keys}
    for a in keys:
        for b in keys:
            if a == b:
                continue
            if np.quantile(key_draws[a] - key_draws[b], lo_q) > 0:  # a significantly ahead of b
                behind[a] += 1
                ahead[b] += 1
    n = len(keys)
    for r in ranked:
        if r.key in key_draws:
            r.rank_low, r.rank_high = 1 + ahead[r.key], n - behind[r.key]
            r.rank = r.rank_low
            r.tie = r.rank_low != r.rank_high
