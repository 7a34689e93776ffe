"""Preference tuning through the train stage, for real: DPO (QLoRA, TRL's DPOTrainer) on the demo's tiny model and
preference pairs made from its facts, under `accelerate launch`, in a Prefect flow with a sqlite MLflow. One training
serves the module (SIGKILLed after its first checkpoint, resumed by the task's retry): TRL's metrics per step in the
stage's MLflow run, no step trained twice, the held-out preference accuracy with its paired test; the stage's key
follows beta and the data; pairs with chosen == rejected are refused before anything trains."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from gauntlet.config.train import TrainSpec
from gauntlet.refs import DatasetRef
from tests.helpers import write_train_files

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SPEC = TrainSpec(objective="dpo", preference={"beta": 0.02}, method="qlora", learning_rate=0.003, max_steps=8,
                 batch_size=8, max_seq_len=64, logging_steps=2, checkpoint_steps=4,
                 lora={"r": 8, "alpha": 16, "dropout": 0.0})
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "train_loss",
           "learning_rate", "grad_norm")


def write_pairs(folder: Path, mutate=None) -> DatasetRef:
    """The demo's preference pairs (what the DVC stage prepare-demo-dpo writes), optionally edited."""
    from gauntlet.demo.data import build_preference

    splits = build_preference(48, 7)
    splits["validation"] = splits["validation"][:24]   # the held-out pairs: fewer, for the test's time
    return write_train_files(folder, splits, mutate)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> DatasetRef:
    return write_pairs(tmp_path_factory.mktemp("pairs"))


class KillAtCheckpoint(threading.Thread):
    """SIGKILLs the training's process group (named by the stage's pid file) once a checkpoint is complete."""

    def __init__(self, out: Path):
        super().__init__(daemon=True)
        self.out, self.killed_at = out, None

    def run(self) -> None:
        from gauntlet.programs.train_kit import latest_checkpoint

        deadline = time.time() + 900   # a loaded CI machine is slow to its first checkpoint
        while time.time() < deadline:
            checkpoint, pid_file = latest_checkpoint(self.out), self.out / "trainer.pid"
            if checkpoint and pid_file.exists():
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
                self.killed_at = int(checkpoint.name.removeprefix("step-"))
                return
            time.sleep(0.05)


@pytest.fixture(scope="module")
def dpo_run(prefect_api, tiny_model_ref, pairs):
    """One DPO training through the stage, killed after its first checkpoint and resumed by the retry."""
    from prefect import flow
    from prefect.runtime import flow_run

    from gauntlet.tasks.train import train
    from gauntlet.tracking import parent_run, tracking_uri

    out = train.output_dir(spec=SPEC, model=tiny_model_ref, data=pairs)

    @flow(name="dpo-with-retries")
    def dpo_flow():
        with parent_run(tracking_uri(), "dpo", "dpo", {"prefect.flow_run_id": str(flow_run.id)}, {}) as run:
            return train.with_options(retry_delay_seconds=1)(spec=SPEC, model=tiny_model_ref, data=pairs, run=run), run

    killer = KillAtCheckpoint(out)
    killer.start()
    started = time.time()
    state = dpo_flow(return_state=True)
    print(f"DPO through the stage, killed and resumed: {time.time() - started:.1f}s")
    assert state.is_completed(), state.message
    trained, run = state.result()
    return trained, run, out, killer.killed_at


def test_dpo_metrics_reach_the_stage_s_mlflow_run_under_trl_s_names(dpo_run) -> None:
    from mlflow.tracking import MlflowClient

    trained, run, out, _ = dpo_run
    c = MlflowClient()
    (train_run,) = c.search_runs([run.experiment_id], f"tags.mlflow.parentRunId = '{run.parent_run_id}' "
                                 "and tags.`gauntlet.stage` = 'train'")
    assert train_run.info.status == "FINISHED" and train_run.data.tags["gauntlet.objective"] == "dpo"
    assert train_run.data.params["train.objective"] == "dpo" and train_run.data.params["train.preference.beta"] == "0.02"
    for name in METRICS:
        steps = sorted({m.step for m in c.get_metric_history(train_run.info.run_id, name)})
        assert steps == [2, 4, 6, 8], (name, steps)   # every logging_steps, the retry's after the kill's
    assert c.get_metric_history(train_run.info.run_id, "val_loss")[-1].step == SPEC.max_steps   # always at the end
    assert c.get_metric_history(train_run.info.run_id, "val_rewards/accuracies")
    margins = c.get_metric_history(train_run.info.run_id, "rewards/margins")
    assert any(m.value != 0 for m in margins)           # TRL's implicit rewards, not a placeholder
    assert 0 <= trained.metrics["preference_accuracy"] <= 1 and trained.metrics["preference_pairs"] == 24
    assert (trained.metrics["preference_accuracy_gain_lo"] <= trained.metrics["preference_accuracy_gain"]
            <= trained.metrics["preference_accuracy_gain_hi"])
    logged = c.get_run(train_run.info.run_id).data.metrics
    assert logged["preference_accuracy_base"] == trained.metrics["preference_accuracy_base"]
    card = (Path(trained.merged.path) / "README.md").read_text()
    assert "objective **dpo**" in card and "reference: base" in card


def test_a_second_run_takes_the_cached_result(dpo_run, tiny_model_ref, pairs) -> None:
    """The receipt's JSON reads back as the same TrainedModel (every metric a finite number)."""
    from prefect import flow

    from gauntlet.tasks.train import train
    from gauntlet.tracking import parent_run, tracking_uri

    trained = dpo_run[0]
    assert all(isinstance(v, float) and v == v for v in trained.metrics.values()), trained.metrics

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    @flow(name="dpo-again")
    def again():
        with parent_run(tracking_uri(), "dpo", "again", {}, {}) as run:
            return train(spec=SPEC, model=tiny_model_ref, data=pairs, run=run)

    state = again(return_state=True)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        (task_run,) = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    assert task_run.state.name == "Cached"
    assert state.result().merged == trained.merged and state.result().metrics == trained.metrics


def test_resume_after_sigkill_trains_no_step_twice(dpo_run) -> None:
    trained, _, out, checkpoint = dpo_run
    assert checkpoint == 4, "the watcher should have killed the first attempt after its first checkpoint"
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    attempts = list(dict.fromkeys(s["pid"] for s in steps))
    assert len(attempts) == 2
    first = [s["step"] for s in steps if s["pid"] == attempts[0]]
    second = [s for s in steps if s["pid"] == attempts[1]]
    assert first[:checkpoint] == list(range(1, checkpoint + 1)) and len(first) < SPEC.max_steps
    assert [s["step"] for s in second] == list(range(checkpoint + 1, SPEC.max_steps + 1))
    assert {s["resumed_from"] for s in second} == {checkpoint}
    assert sorted(s["step"] for s in steps if s["step"] <= checkpoint) == list(range(1, checkpoint + 1))
    # the resumed schedule carries on where it stopped: one linear-decay step per optimizer step
    assert [s["lr"] for s in second] == pytest.approx([0.003 * (1 - (k - 1) / 8) for k in range(5, 9)], rel=1e-6)
    assert trained.steps == SPEC.max_steps
    assert json.loads((out / "result.json").read_text())["resumed_from_step"] == checkpoint
    assert not (out / "checkpoints").exists() and Path(trained.adapter_path, "adapter_model.safetensors").exists()


def test_the_stage_key_changes_with_beta_the_objective_and_the_data(tiny_model_ref, pairs, tmp_path) -> None:
    from gauntlet.tasks.train import train

    key = train.output_dir(spec=SPEC, model=tiny_model_ref, data=pairs)
    assert train.output_dir(spec=SPEC.model_copy(), model=tiny_model_ref, data=pairs) == key
    other_beta = SPEC.model_copy(update={"preference": SPEC.preference.model_copy(update={"beta": 0.1})})
    assert train.output_dir(spec=other_beta, model=tiny_model_ref, data=pairs) != key
    assert train.output_dir(spec=SPEC.model_copy(update={"objective": "ipo", "preference": None}),
                            model=tiny_model_ref, data=pairs) != key
    other_pairs = pairs.model_copy(update={"md5": "another-version-of-the-pairs"})
    assert train.output_dir(spec=SPEC, model=tiny_model_ref, data=other_pairs) != key


def test_pairs_with_chosen_equal_to_rejected_are_refused_before_training(tiny_model_ref, tmp_path) -> None:
    from gauntlet.training import TrainingConfigError, train_model

    def break_one(splits):
        splits["train"][3]["rejected"] = splits["train"][3]["chosen"]

    broken = write_pairs(tmp_path / "broken", break_one)
    with pytest.raises(TrainingConfigError, match=r"train.jsonl:4: chosen == rejected: the pair prefers nothing"):
        train_model(SPEC, tiny_model_ref, broken, tmp_path / "out")
    assert not (tmp_path / "out" / "train_args.json").exists()   # refused before the launch

    sft = write_pairs(tmp_path / "sft", lambda s: s.update(train=[{"instruction": "q", "input": "", "output": "a"}]))
    with pytest.raises(TrainingConfigError, match=r"has alpaca rows \{instruction, input, output\}, but "
                                                  r"train.objective dpo trains on rows \{prompt, chosen, rejected\}"):
        train_model(SPEC, tiny_model_ref, sft, tmp_path / "out")


def test_the_data_checks_measure_pairs_and_find_eval_items_in_their_prompts(tiny_model_ref, tmp_path) -> None:
    """check_data on preference pairs: lengths from the prompt and the longer completion, contamination from the
    prompt's instruction (the alpaca wrapper taken off), chosen == rejected a failed check."""
    from gauntlet.config.data import DataChecksSpec
    from gauntlet.data.checks import check_data
    from gauntlet.demo.data import build, write_jsonl

    evaluation = build(48, 7)["eval"]

    def leak(splits):   # an evaluation question asked verbatim in a training pair
        splits["train"][0]["prompt"] = f"### Instruction:\n{evaluation[0]['instruction']}\n\n### Response:\n"
        splits["train"][1]["rejected"] = splits["train"][1]["chosen"].upper()

    data = write_pairs(tmp_path / "leaky", leak)
    write_jsonl(tmp_path / "leaky" / "eval.jsonl", evaluation)
    data = data.model_copy(update={"eval_path": str(tmp_path / "leaky" / "eval.jsonl")})
    report = check_data(DataChecksSpec(), 16, data, tiny_model_ref)
    assert report.contamination_rate == pytest.approx(1 / 48) and report.contaminated_examples == [
        evaluation[0]["instruction"]]
    assert report.truncated_rate == 1.0 and report.prompt_tokens["p50"] > 16   # prompt + completion over 16
    assert not report.passed
    assert any("pair(s) with chosen == rejected (rows [2])" in p for p in report.problems), report.problems
    assert any("appear in the training data" in p for p in report.problems)


def test_the_gate_judges_the_preference_gain_and_the_registry_records_both_generations(dpo_run, tiny_model_ref,
                                                                                       pairs) -> None:
    """The module's DPO model through the flow's own steps after training (evaluate both models, add the held-out
    preference accuracy, register, gate, promote), then fetched back from the registry as the start of a next
    run: its lineage names the DPO version, its objective, its base and its data."""
    import hashlib
    import uuid

    from mlflow.tracking import MlflowClient
    from prefect import flow

    from flows.finetune import evaluated, register_gate_promote
    from gauntlet.config.load import load_spec
    from gauntlet.config.model import ModelSpec
    from gauntlet.demo.data import build_preference, write_jsonl
    from gauntlet.registry.candidates import lineage_of
    from gauntlet.tasks.models import fetch_model, resolve_model
    from gauntlet.tracking import parent_run, tracking_uri
    from tests.helpers import REPO

    trained = dpo_run[0]
    eval_file = Path(pairs.repo) / "eval.jsonl"
    write_jsonl(eval_file, build_preference(48, 7)["eval"])
    data = pairs.model_copy(update={"eval_path": str(eval_file),
                                    "eval_md5": hashlib.md5(eval_file.read_bytes()).hexdigest()})
    name = f"dpo-gate-{uuid.uuid4().hex[:8]}"
    spec = load_spec(REPO / "configs" / "demo-dpo.yaml", [
        f"registry.model_name={name}", "gate.min_gain_over_base=null", "gate.min_preference_gain=0.0",
        "eval.speed_probe.enabled=false"])

    @flow(name="dpo-gate")
    def gated():
        with parent_run(tracking_uri(), "dpo", "gate", {}, {}) as run:
            base_report, report = evaluated(spec, tiny_model_ref, trained, data, run)
            decision, _ = register_gate_promote(spec, spec.registry, trained, report, base_report, data, run)
            start = fetch_model(resolved=resolve_model(spec=ModelSpec(source=f"models:/{name}/1"), run=run), run=run)
            return report, decision, start, lineage_of(trained.model_copy(update={"base": start}), data, "next", run)

    state = gated(return_state=True)
    assert state.is_completed(), state.message
    report, decision, start, next_lineage = state.result()
    m = trained.metrics
    assert report.score("preference_heldout", "preference_accuracy") == pytest.approx(m["preference_accuracy"])
    (rule,) = [r for r in decision.rules if r.rule == "preference_gain[preference_heldout]"]
    # the gate's paired test over the pairs is the one the train stage logged, and its verdict follows its interval
    assert (rule.measured, rule.lo, rule.hi) == pytest.approx(
        (m["preference_accuracy_gain"], m["preference_accuracy_gain_lo"], m["preference_accuracy_gain_hi"]))
    assert rule.passed == (rule.lo > 0) and rule.against == "starting model"
    tags = MlflowClient().get_model_version(name, "1").tags
    assert tags["train.objective"] == "dpo" and tags["gate.verdict"] == ("passed" if decision.passed else "failed")
    assert float(tags["score.preference_heldout.preference_accuracy"]) == pytest.approx(m["preference_accuracy"])
    # the registered DPO model as the start of a next run: both generations in its lineage
    assert start.source == f"models:/{name}/1" and start.lineage["registry.version"] == f"{name}/1"
    assert start.lineage["train.objective"] == "dpo" and start.lineage["data.md5"] == pairs.md5
    assert start.lineage["base_model.source"] == tiny_model_ref.source
    assert next_lineage["start_model.base_model.sha"] == tiny_model_ref.sha
    assert next_lineage["start_model.train.objective"] == "dpo" and next_lineage["base_model.source"] == start.source
