"""One score against the same score of another report: the paired test over the items both answered, or why
there is none (no report, no per-item records: point estimates) or none may be made (measured differently).

The gate's comparison rules (:mod:`gauntlet.gate`) call it for every task they compare with the champion or the
starting model. No Prefect, no MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass

from gauntlet.eval.protocol import task_differences
from gauntlet.eval.scores import Score, find
from gauntlet.eval.stats import Comparison, paired_difference
from gauntlet.refs import EvalReport


@dataclass(frozen=True)
class Unpaired:
    """Why a score cannot be compared item by item: ``refused`` when it cannot be compared at all."""

    why: str
    refused: bool = False


def paired_comparison(report: EvalReport, score: Score, other: EvalReport | None, label: str, tested: float,
                      alpha: float) -> Comparison | Unpaired:
    """``score`` (of ``report``) against the same task and metric in ``other`` (named ``label`` in the reasons),
    paired over their common items, its ``1 - alpha`` interval testing the difference ``tested``."""
    if other is None:
        return Unpaired(f"no report of the {label}")
    differences = task_differences(report, other, score.task)
    if differences:
        more = f"; … {len(differences) - 3} more" if len(differences) > 3 else ""
        return Unpaired(f"the {label} was measured differently on {score.task!r} ("
                        + "; ".join(differences[:3]) + more + ")", refused=True)
    theirs = find(other, score.task, score.metric)
    if not score.items or theirs is None or not theirs.items:
        return Unpaired(f"no per-item records of the {label}: point estimates compared")
    try:
        return paired_difference(score.items, theirs.items, alpha=alpha, tested=tested)
    except ValueError as e:
        return Unpaired(str(e), refused=True)
