"""The held-out preference accuracy as a score of the reports: does the model give ``chosen`` a higher
log-likelihood than ``rejected`` on validation pairs it never trained on?

The train stage measures it per pair for the starting model (the base, with the adapter disabled) and for the
trained model (``TrainedModel.preference_accuracy``). The flow adds each to its model's report as one more task
(``preference_heldout``, metric ``preference_accuracy``, per-pair items keyed ``preference_heldout/<i>``), as the
judge's win rate is added: so the gate's ``min_preference_gain`` compares the two item by item (a paired test),
and the registry's score tags, the summary and the board read it like any score. No Prefect, no MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from gauntlet.eval.judge import with_results
from gauntlet.eval.stats import interval
from gauntlet.refs import EvalReport, TaskResult, TaskScore, TrainedModel

PREFERENCE_TASK = "preference_heldout"
PREFERENCE_METRIC = "preference_accuracy"


def as_task_result(per_pair: list[float], results_path: str) -> TaskResult:
    """Per-pair outcomes (1: chosen preferred, 0: not) as a task result, with the Wilson interval; chance is 0.5.
    ``results_path``: the file that holds them (the train stage's result.json)."""
    est = interval(per_pair)
    score = TaskScore(task=PREFERENCE_TASK, metric=PREFERENCE_METRIC, value=est.value, stderr=est.stderr,
                      ci_low=est.lo, ci_high=est.hi, n=len(per_pair))
    setting = {"measured_by": "the train stage: sum of token log-likelihoods, chosen vs rejected",
               "pairs": len(per_pair)}
    return TaskResult(task=PREFERENCE_TASK, engine_task="preference-heldout", source="train", metric=PREFERENCE_METRIC,
                      value=est.value, stderr=est.stderr, random_baseline=0.5,
                       random_baseline_source="a coin flip per pair",
                      scores=[score], versions={PREFERENCE_TASK: "1"}, num_fewshot=0,
                      n_samples={PREFERENCE_TASK: len(per_pair)},
                      item_scores={PREFERENCE_METRIC: {f"{PREFERENCE_TASK}/{i}": v for i, v in enumerate(per_pair)}},
                      effective={PREFERENCE_TASK: setting}, results_path=results_path, samples_path=results_path)


def with_preference_accuracy(report: EvalReport, trained: TrainedModel,
                             which: Literal["base", "trained"]) -> EvalReport:
    """``report`` with the held-out preference accuracy of ``which`` model of ``trained`` (unchanged when the
    training measured none: SFT, or a result from before it was kept per pair)."""
    per_pair = (trained.preference_accuracy or {}).get(which)
    if not per_pair:
        return report
    return with_results(report, [as_task_result(per_pair, str(Path(trained.output_dir) / "result.json"))])
