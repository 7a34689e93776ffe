"""The ``gate:`` and ``registry:`` sections: the rules a model must pass, and where it is registered."""

from __future__ import annotations

from pydantic import Field, field_validator

from gauntlet.config.base import Strict


class PerfCeilings(Strict):
    """Upper limits on what the speed probe measured (names as in EvalReport.perf); None: no limit.
    A ceiling set while the report has no speed probe fails the gate."""

    first_token_latency_ms: float | None = Field(None, gt=0)
    peak_memory_gb: float | None = Field(None, gt=0)
    size_on_disk_gb: float | None = Field(None, gt=0)


class Significance(Strict):
    """Which comparisons must be statistically significant (a paired test over the items both models
    answered, at ``gate.alpha``) before they fail, or pass, the gate."""

    no_regression: bool = Field(True, description="fail only on a drop beyond max_regression whose whole interval "
                                                  "lies below it (off: the point estimate decides)")
    min_gain_over_base: bool = Field(False, description="require the lower end of the gain's interval to clear "
                                                        "min_gain_over_base (off: the point estimate decides)")
    min_win_rate: bool = Field(False, description="require the lower end of the judge win rate's interval to clear "
                                                  "min_win_rate (off: the point estimate decides)")
    max_harmful_rate: bool = Field(False, description="require the upper end of the harmful rate's interval to stay "
                                                      "under max_harmful_rate (off: the point estimate decides)")
    max_over_refusal_rate: bool = Field(False, description="require the upper end of the over-refusal rate's "
                                                           "interval to stay under max_over_refusal_rate")
    min_preference_gain: bool = Field(True, description="require the lower end of the held-out preference "
                                                        "accuracy gain's interval to clear min_preference_gain "
                                                        "(off: the point estimate decides)")
    max_perplexity_increase: bool = Field(True, description="fail only on a perplexity rise beyond "
                                                            "max_perplexity_increase whose whole interval lies above "
                                                            "it (off: the point estimate decides)")


class GateSpec(Strict):
    metric: str = Field("acc", description="the metric of each task that the gate reads, as lm-eval names it; a "
                                           "name without a filter (exact_match) reads the task's only filtered "
                                           "score (exact_match,first-word); one fitting several is refused")
    min_scores: dict[str, float] = Field(default_factory=dict, description="task -> minimum score")
    min_average: float | None = Field(None, description="minimum mean of `metric` over the report's tasks")
    max_regression: float = Field(0.0, ge=0, description="largest allowed drop against the champion, per task, "
                                                          "in the metric's own units (acc 0.02 = 2 points)")
    max_regression_by_task: dict[str, float] = Field(default_factory=dict,
                                                     description="task -> its own max_regression")
    required_tasks: list[str] = Field(default_factory=list,
                                      description="tasks that must have a score; a missing one fails the gate")
    ceilings: PerfCeilings = PerfCeilings()
    min_gain_over_base: float | None = Field(None, description="require the fine-tuned model to beat its base by this")
    max_regression_from_base: float | None = Field(
        None, ge=0, description="largest allowed drop against the starting model (the base), per task, in the "
                                "metric's units: preference tuning must not cost the benchmarks (the switch "
                                "significance.no_regression applies, as against the champion)")
    min_win_rate: float | None = Field(None, ge=0, le=1, description="minimum win rate of the candidate against the "
                                                                   "champion (or base) by the LLM judge (eval.judge)")
    max_harmful_rate: float | None = Field(None, ge=0, le=1, description="largest share of harmful requests the "
                                                                        "candidate may comply with (eval.safety)")
    max_over_refusal_rate: float | None = Field(None, ge=0, le=1, description="largest share of benign requests the "
                                                                             "candidate may refuse (eval.safety)")
    min_preference_gain: float | None = Field(
        None, ge=-1, le=1, description="a preference objective (train.objective): require the held-out preference "
                                       "accuracy (chosen preferred on validation pairs never trained on) to beat the "
                                       "starting model's by this, paired over the same pairs (0.05 = 5 points)")
    max_perplexity_increase: float | None = Field(
        None, ge=0, description="largest allowed rise of the held-out byte perplexity against the base model, "
                                "relative (0.05 = 5%); needs eval.perplexity and eval.compare_with_base")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="significance level of the paired comparisons: "
                                                         "their intervals are 1 - alpha")
    significance: Significance = Significance()
    register_variants: list[str] = Field(
        default_factory=list, description="quantize.variants names that may be registered (as <model_name>-<variant>) "
                                          "when they pass the same rules as the fine-tuned model")

    @field_validator("max_regression_by_task")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        negative = {task: limit for task, limit in v.items() if limit < 0}
        if negative:
            raise ValueError(f"allowed regressions must be >= 0; got {negative}")
        return v


class RegistrySpec(Strict):
    model_name: str = Field(..., min_length=1)
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    lock_timeout_s: float = Field(300.0, gt=0, description="how long a promotion waits for another one to finish")

