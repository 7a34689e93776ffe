"""The pipeline on a real instruct model: a short QLoRA fine-tune of SmolLM2-135M-Instruct (a GGUF source)
on the demo's DVC-tracked facts, evaluated on a multiple-choice task and on a generation task scored through a
custom filter (``exact_match,first-word``), gated on that generation task. It runs to the end, every metric
name reaches MLflow in one sanitised form, and the per-item answers move the way the training data pushes.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from gauntlet.refs import EvalReport
from tests.helpers import write_demo_config
from tests.integration.test_real_model import GGUF_NAME, smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

MODEL_NAME = f"smollm2-facts-{uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="module")
def finetuned(prefect_api, dvc_repo, tmp_path_factory):
    from gauntlet.flows.finetune import finetune

    root = tmp_path_factory.mktemp("real-finetune")
    source = root / "smollm2"
    source.mkdir()
    shutil.copy(smollm2_gguf(), source / GGUF_NAME)

    def mutate(raw: dict) -> None:
        raw["name"] = "real-finetune"
        raw["model"] = {"source": str(source)}
        # QLoRA (the config's method) for 30 steps: ~1.7 s a step for this model on an idle 2-core CPU
        raw["train"].update(method="qlora", learning_rate=0.002, max_steps=30, batch_size=16, max_seq_len=64,
                            logging_steps=5)
        raw.pop("quantize", None)
        raw["eval"] = {"tasks": ["demo_facts", "demo_facts_gen"], "batch_size": 16,
                       "speed_probe": {"enabled": False}}
        raw["gate"] = {"metric": "exact_match", "required_tasks": ["demo_facts_gen"], "max_regression": 0.05}
        raw["registry"] = {"model_name": MODEL_NAME}
        raw["tracking"] = {"experiment": "real-finetune"}

    config = write_demo_config(root, mutate)
    state = finetune(config=str(config), overrides=[f"data.repo={dvc_repo}"], return_state=True)
    assert state.is_completed(), state.message
    return state.result()


def stage_report(c, run_id: str) -> EvalReport:
    return EvalReport.model_validate_json(Path(c.download_artifacts(run_id, "report.json")).read_text())


def test_a_generation_task_with_a_custom_filter_is_gated_and_the_run_ends(finetuned) -> None:
    from gauntlet.tracking import client, tracking_uri

    summary = finetuned
    assert summary.registered_version is not None  # registered: the run reached its last stages
    rules = {rule: (verdict, detail) for rule, verdict, detail in summary.gate_rules}
    verdict, detail = rules["required[demo_facts_gen]"]
    assert verdict == "pass" and "exact_match,first-word=" in detail, detail  # found without its filter

    # every metric of every run of this experiment reached MLflow, in one sanitised form (no commas)
    c = client(tracking_uri())
    parent = c.get_run(summary.mlflow_run_id)
    runs = c.search_runs([parent.info.experiment_id])
    keys = {k for r in runs for k in r.data.metrics}
    assert keys and not [k for k in keys if "," in k]
    assert "demo_facts_gen.exact_match/first-word" in keys and "demo_facts.acc" in keys
    version = c.get_model_version(MODEL_NAME, summary.registered_version)
    assert "score.demo_facts_gen.exact_match/first-word" in version.tags


def test_the_fine_tune_moves_per_item_answers_toward_the_training_data(finetuned) -> None:
    from gauntlet.tracking import client, tracking_uri

    summary = finetuned
    c = client(tracking_uri())
    base = stage_report(c, summary.stage_runs["evaluate_base"])
    tuned = stage_report(c, summary.stage_runs["evaluate"])
    for task, metric in (("demo_facts", "acc"), ("demo_facts_gen", "exact_match,first-word")):
        before = next(r for r in base.task_results if r.task == task).item_scores[metric]
        after = next(r for r in tuned.task_results if r.task == task).item_scores[metric]
        assert before.keys() == after.keys() and len(before) == 48
        learned = sum(after[k] > before[k] for k in before)
        forgot = sum(after[k] < before[k] for k in before)
        print(f"\n{task} {metric}: base {sum(before.values())}/48 -> fine-tuned {sum(after.values())}/48 "
              f"({learned} items learned, {forgot} forgotten)")
        assert learned > forgot + 3, (task, learned, forgot)
