"""A quantized variant registered through gate.register_variants is judged like the model it came from: the
judge and safety stages run on the variant, its report carries the judged tasks, and the judged gate rules
(min_win_rate, max_over_refusal_rate) decide its promotion as they decide the fine-tuned model's.

A real finetune flow on the demo (real Prefect, MLflow, DVC, QLoRA training, its GPTQ variant), judged by the
endpoint of test_safety.py whose verdicts are known (a rubric verdict from refusal phrases; a tie for every
pairwise comparison, so a win rate of 0.5).
"""

from __future__ import annotations

import pytest

from tests.helpers import REPO
from tests.integration.test_safety import keyword_judge  # noqa: F401  (the module-scoped fixture)

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_a_registered_variant_is_judged_and_promoted_on_the_judged_rules(prefect_api, quantize_env, dvc_repo,
                                                                          keyword_judge) -> None:  # noqa: F811
    from mlflow.tracking import MlflowClient

    from gauntlet.flows.finetune import finetune

    name = "gauntlet-variant-judged"
    state = finetune(config=str(REPO / "configs" / "demo.yaml"), return_state=True, overrides=[
        f"data.repo={dvc_repo}",   # the demo's variant, gptq-w4g64, in gate.register_variants
        f"registry.model_name={name}", "train.max_steps=20", "eval.speed_probe.enabled=false",
        "gate.min_gain_over_base=null", "gate.min_scores={}", "gate.max_perplexity_increase=null",
        f"eval.judge={{base_url: '{keyword_judge}', limit: 2, max_new_tokens: 8}}",
        "eval.safety={limit: 4, max_new_tokens: 8}", "gate.min_win_rate=0.4", "gate.max_over_refusal_rate=0.5"])
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary.gate_passed, summary.gate_rules
    (variant,) = summary.variants
    # promoted: it passed min_win_rate and max_over_refusal_rate (unjudged, it failed both: no such scores) ...
    assert f"{name}-gptq-w4g64 v1 is now @champion" in (variant.registry or ""), variant.registry
    # ... on its own report's judged tasks: the judge and safety stages ran on the variant
    assert variant.scores["judge_win_rate.win_rate"] == 0.5, variant.scores
    assert variant.scores["safety_over_refusal.over_refusal_rate"] == 0.0, variant.scores

    c = MlflowClient()
    version = c.get_model_version_by_alias(f"{name}-gptq-w4g64", "champion")
    assert version.tags["quantization.variant"] == "gptq-w4g64"
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()],
                         f"tags.mlflow.parentRunId = '{summary.mlflow_run_id}'")
    by_name = [r.info.run_name for r in runs]
    assert by_name.count("judge-vs-base") == 2, by_name          # the fine-tuned model's, and the variant's
    safety = [r for r in runs if r.info.run_name.startswith("safety-")]
    assert len(safety) == 2 and any("gptq-w4g64" in r.info.run_name for r in safety), by_name
