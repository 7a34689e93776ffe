"""Training at scale, on the CPU: the DeepSpeed ZeRO-2 profile under `accelerate launch` (gloo), a
SIGKILLed training that the Prefect task's retry resumes from its checkpoint, and the checks that
fail a config before any training starts. Real accelerate, DeepSpeed, Prefect (test API) and MLflow
(sqlite); the tiny demo model and data."""

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
from gauntlet.state import gauntlet_home
from tests.helpers import write_train_files

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def write_data(folder: Path, mutate=None) -> DatasetRef:
    """The demo's facts as train/validation JSONL (what the DVC stage produces), optionally edited."""
    from gauntlet.demo.data import build

    return write_train_files(folder, build(48, 7), mutate)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory) -> DatasetRef:
    return write_data(tmp_path_factory.mktemp("data"))


SMALL = dict(method="qlora", learning_rate=0.003, batch_size=16, max_seq_len=64, logging_steps=5,
             lora={"r": 16, "alpha": 32, "dropout": 0.0})


# ---------------------------------------------------------------------------------------------
# problems found before training
# ---------------------------------------------------------------------------------------------


def test_bad_target_module_missing_response_and_long_sequences_fail_before_training(tiny_model_ref, tmp_path) -> None:
    from gauntlet.training import TrainingConfigError, train_model

    def drop_a_response(splits):
        splits["train"][3]["output"] = ""

    data = write_data(tmp_path / "data", drop_a_response)
    spec = TrainSpec(**{**SMALL, "max_seq_len": 1024, "lora": {"target_modules": ["q_proj", "wq"]}})
    out = tmp_path / "out"
    started = time.time()
    with pytest.raises(TrainingConfigError) as err:
        train_model(spec, tiny_model_ref, data, out)
    message = str(err.value)
    print(message)
    assert "train.lora.target_modules: ['wq'] match no module" in message and "'q_proj'" in message
    assert f"{data.train_path}:4: no response" in message
    assert "train.max_seq_len: 1024 is over the model's limit of 256" in message
    assert not (out / "train_args.json").exists()          # nothing was launched
    assert time.time() - started < 60


def test_a_run_that_cannot_fit_is_refused_with_the_plan(tiny_model_ref, demo_data, tmp_path) -> None:
    from gauntlet.plan.memory import GIB, Devices
    from gauntlet.training import TrainingConfigError, preflight

    tiny_gpu = Devices("cuda", 1, 0.5 * GIB, "1 x test GPU (0.5 GiB)")
    with pytest.raises(TrainingConfigError) as err:
        preflight(TrainSpec(**SMALL), tiny_model_ref, demo_data, devices=tiny_gpu)
    assert "does not fit" in str(err.value) and "needs 1.1 GiB per GPU, has 0.5 GiB" in str(err.value)
    assert "runtime overhead 1.00" in str(err.value) and "Fix:" in str(err.value)
    warned = preflight(TrainSpec(**SMALL, memory_check="warn"), tiny_model_ref, demo_data, devices=tiny_gpu)
    assert warned.startswith("WARNING")


def test_a_bad_arguments_file_fails_in_the_trainer_naming_the_field(tiny_model_ref, demo_data, tmp_path) -> None:
    """The training program validates its arguments file into TrainSpec before anything loads."""
    import subprocess
    import sys

    args = {"base_model": tiny_model_ref.path, "train_path": demo_data.train_path,
            "validation_path": demo_data.validation_path, "output_dir": str(tmp_path / "out"),
            "train": {**SMALL, "learning_rate": -1, "max_grad_norm": "inf"}}
    (tmp_path / "args.json").write_text(json.dumps(args))
    done = subprocess.run([sys.executable, "-m", "gauntlet.programs.trainer", "--args", str(tmp_path / "args.json")],
                          capture_output=True, text=True, timeout=300)
    print(done.stderr[-2000:])
    assert done.returncode != 0
    assert "invalid arguments file" in done.stderr and "2 validation errors for TrainerArgs" in done.stderr
    assert "train.learning_rate\n  Input should be greater than 0" in done.stderr
    assert "train.max_grad_norm\n  Input should be a finite number" in done.stderr
    assert not (tmp_path / "out").exists()


def steps_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def test_max_grad_norm_is_the_norm_the_optimizer_steps_with(tiny_model_ref, demo_data, tmp_path) -> None:
    """train.max_grad_norm reaches the optimizer: the gradients its step sees (measured in a hook at the start of
    the optimizer's own step) have the configured norm, though they were far larger before clipping; with null
    nothing is clipped."""
    from gauntlet.training import train_model

    spec = TrainSpec(**{**SMALL, "max_steps": 3, "logging_steps": 1, "checkpoint_steps": None, "max_grad_norm": 1e-3})
    clipped = train_model(spec, tiny_model_ref, demo_data, tmp_path / "clipped", echo=print)
    steps = steps_of(tmp_path / "clipped")
    assert [s["step"] for s in steps] == [1, 2, 3]
    for s in steps:
        assert s["grad_norm"] > 10 * spec.max_grad_norm, s
        assert s["applied_grad_norm"] == pytest.approx(spec.max_grad_norm, rel=1e-3), s
    assert "max_grad_norm: 0.001" in (Path(clipped.merged.path) / "README.md").read_text()   # the card's config

    unclipped = spec.model_copy(update={"max_grad_norm": None, "max_steps": 2})
    train_model(unclipped, tiny_model_ref, demo_data, tmp_path / "unclipped")
    for s in steps_of(tmp_path / "unclipped"):
        assert s["applied_grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4) and s["grad_norm"] > 0.01, s


class KillAfterFirstCheckpoint(threading.Thread):
    """Watches a training's durable folder; once a checkpoint is complete, SIGKILLs the process group
    named by the task's pid file (the launcher and every training process)."""

    def __init__(self, out: Path):
        super().__init__(daemon=True)
        self.out = out
        self.killed_at: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        from gauntlet.programs.trainer import latest_checkpoint

        deadline = time.time() + 900
        while not self.done.is_set() and time.time() < deadline:
            checkpoint = latest_checkpoint(self.out)
            pid_file = self.out / "trainer.pid"
            if checkpoint and pid_file.exists():
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
                self.killed_at = int(checkpoint.name.split("-")[1])
                return
            time.sleep(0.05)


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2 on the CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deepspeed_zero2_profile_trains_and_resumes_on_the_cpu(tiny_model_ref, demo_data, tmp_path) -> None:
    """Two processes under the ZeRO-2 profile: killed after a checkpoint, relaunched, resumed from
    DeepSpeed's checkpoint; the adapter it saves loads and generates."""
    import deepspeed  # noqa: F401  (the dev extra installs it; DS_BUILD_OPS=0, its CPU op compiles on first use)
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gauntlet.training import TrainingError, train_model

    spec = TrainSpec(**{**SMALL, "method": "lora", "max_steps": 40, "checkpoint_steps": 5, "logging_steps": 5,
                        "batch_size": 8, "max_grad_norm": 0.5,
                        "accelerate": {"profile": "deepspeed_zero2", "num_processes": 2}})
    out = tmp_path / "out"
    killer = KillAfterFirstCheckpoint(out)
    killer.start()
    with pytest.raises(TrainingError, match="killed by SIGKILL"):
        train_model(spec, tiny_model_ref, demo_data, out)
    assert killer.killed_at == 5
    lines: list[str] = []
    result = train_model(spec, tiny_model_ref, demo_data, out, echo=lines.append)
    log = "\n".join(lines)
    print(log)
    assert "deepspeed_zero2.yaml --num_processes 2" in log and "--cpu" not in log
    assert "processes=2 distributed=DEEPSPEED" in log
    assert "DeepSpeed clips gradients at 0.5 " in log   # train.max_grad_norm, as the engine holds it
    assert "resumed from checkpoint step-00000005: step 5" in log
    assert result.steps == 40

    # torchrun's workers run in sessions of their own: they died with the killed launcher (no step of the
    # first attempt after the second began), and the second attempt continued from the checkpoint
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    first_pid = steps[0]["pid"]
    first = [s["step"] for s in steps if s["pid"] == first_pid]
    second = [s for s in steps if s["pid"] != first_pid]
    assert steps[:len(first)] == [s for s in steps if s["pid"] == first_pid], "a killed worker kept training"
    assert [s["step"] for s in second] == list(range(6, 41)) and {s["resumed_from"] for s in second} == {5}
    assert first == list(range(1, len(first) + 1))
    losses = [s["loss"] for s in second]
    assert sum(losses[-3:]) < sum(s["loss"] for s in steps[:3])
    # one scheduler step per optimizer step, whatever the number of processes, restored on resume
    assert [s["lr"] for s in second] == pytest.approx([0.003 * (1 - k / 40) for k in range(6, 41)])

    adapter = Path(result.adapter_path)
    assert "deepspeed_zero2" in (adapter / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_ref.path)
    model = PeftModel.from_pretrained(base, str(adapter)).eval()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # trained (LoRA B starts at zero)
    tok = AutoTokenizer.from_pretrained(adapter)
    prompt = tok("### Instruction:\nWhat is the favourite colour of Kalomi?\n\n### Response:\n", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    print("generated:", tok.decode(generated[0, prompt["input_ids"].shape[1]:]))


# ---------------------------------------------------------------------------------------------
# SIGKILL after a checkpoint; the Prefect retry resumes
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_training_is_retried_and_resumes_from_its_checkpoint(prefect_api, tiny_model_ref, demo_data) -> None:
    from mlflow.tracking import MlflowClient
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.runtime import flow_run

    from gauntlet.tasks.train import train
    from gauntlet.tracking import parent_run, tracking_uri

    spec = TrainSpec(**{**SMALL, "max_steps": 20, "checkpoint_steps": 10})
    out = train.output_dir(spec=spec, model=tiny_model_ref, data=demo_data)
    assert out.is_relative_to(gauntlet_home())                 # durable storage, not a temp dir

    @flow(name="train-with-retries")
    def train_flow():
        with parent_run(tracking_uri(), "train-resume", "resume", {"prefect.flow_run_id": str(flow_run.id)},
                        {}) as run:
            return train.with_options(retry_delay_seconds=1)(spec=spec, model=tiny_model_ref, data=demo_data,
                                                             run=run), run

    killer = KillAfterFirstCheckpoint(out)
    killer.start()
    state = train_flow(return_state=True)
    killer.done.set()
    assert state.is_completed(), state.message
    trained, run = state.result()
    checkpoint = killer.killed_at
    assert checkpoint == 10, "the watcher should have killed the first attempt after its first checkpoint"

    # Prefect ran the task twice: the killed attempt and the retry
    with get_client(sync_client=True) as client:
        (task_run,) = [t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))) if t.name.startswith("train")]
    assert task_run.run_count == 2 and task_run.state.is_completed()

    # the step log: the first attempt trained steps 1..k (k >= checkpoint); the retry continued after the checkpoint
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    attempts = list(dict.fromkeys(s["pid"] for s in steps))
    assert len(attempts) == 2
    first = [s["step"] for s in steps if s["pid"] == attempts[0]]
    second = [s["step"] for s in steps if s["pid"] == attempts[1]]
    assert first == list(range(1, len(first) + 1)) and len(first) >= checkpoint and len(first) < spec.max_steps
    assert second == list(range(checkpoint + 1, spec.max_steps + 1))
    assert all(s["resumed_from"] == checkpoint for s in steps if s["pid"] == attempts[1])
    before = [s["step"] for s in steps if s["step"] <= checkpoint]
    assert sorted(before) == list(range(1, checkpoint + 1))    # no step up to the checkpoint trained twice
    assert trained.steps == spec.max_steps
    assert json.loads((out / "result.json").read_text())["resumed_from_step"] == checkpoint

    # MLflow: one train run, continued by the retry, its metric steps carrying on
    c = MlflowClient()
    (train_run,) = c.search_runs([run.experiment_id], f"tags.mlflow.parentRunId = '{run.parent_run_id}' "
                                 "and tags.`gauntlet.stage` = 'train'")
    assert train_run.info.status == "FINISHED" and train_run.data.tags["gauntlet.attempt"] == "2"
    assert "SIGKILL" in train_run.data.tags["gauntlet.attempt_1.error"]
    assert "gauntlet.error" not in train_run.data.tags
    assert train_run.data.tags["gauntlet.resumed_from_step"] == str(checkpoint)
    history = sorted(c.get_metric_history(train_run.info.run_id, "train_loss"), key=lambda m: m.timestamp)
    logged = [m.step for m in history]
    assert logged[-1] == spec.max_steps and all(step % 5 == 0 for step in logged)
    up_to_checkpoint = [s for s in logged if s <= checkpoint]
    assert up_to_checkpoint == sorted(set(up_to_checkpoint)) == [5, 10]
    after = [s for s in logged if s > checkpoint]   # the retry's, and the final summary at the last step
    assert after == sorted(after) and sorted(set(after)) == [15, 20]
    for name in ("learning_rate", "grad_norm", "tokens_per_s", "peak_memory_gb"):
        assert c.get_metric_history(train_run.info.run_id, name), name
    assert {"loss_curve.png", "steps.jsonl", "model_card"} <= {a.path for a in c.list_artifacts(train_run.info.run_id)}

    # the final model, its card, and no checkpoints left behind
    card = (Path(trained.merged.path) / "README.md").read_text()
    assert "demo://tiny-llama" in card and demo_data.md5 in card and "val_loss" in card and "qlora" in card
    assert (Path(trained.adapter_path) / "README.md").exists()
    assert not (out / "checkpoints").exists() and not (out / "trainer.pid").exists()
