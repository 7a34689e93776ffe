"""Stage 3, training: run ``tasks.trainer`` under ``accelerate launch`` as a subprocess.

Before launching, :func:`preflight` checks what a retry cannot fix, without loading any weights: LoRA
target modules the model lacks, a sequence length over the model's limit, training rows without a
response, chat rows without a chat template, and (``train.memory_check``) the planner's memory
estimate against the visible devices (:mod:`tasks.plan`). Then the task writes the resolved arguments
to a JSON file in its durable output folder, launches
``accelerate launch [--config_file deployments/accelerate/<profile>.yaml] -m tasks.trainer``,
streams the trainer's output into the Prefect log, and reads back ``result.json``.

Crash and retry: the trainer checkpoints into the same durable folder (``$GAUNTLET_HOME/stages/train/
<key>/checkpoints``), the Prefect task retries, and the retry's trainer resumes from the newest
checkpoint. The MLflow run of the failed attempt is continued, so its metrics keep their step numbers.

``trainer.pid`` in the output folder holds the process-group id of the running training while it
runs (``kill -- -$(cat trainer.pid)`` stops every process of it); it is removed when training ends.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable

from prefect import get_run_logger, task

from tasks.caching import Stage, retry_unless
from tasks.plan import (
    ACCELERATE_CONFIGS,
    Devices,
    PlanError,
    check_model_fit,
    check_training_memory,
    host_memory,
    model_shape,
    profile_named,
    visible_devices,
)
from tasks.refs import DatasetRef, ModelRef, TrainedModel
from tasks.sft_data import DataFormatError, check_file, check_tokenizer, read_jsonl, tokenize_rows
from tasks.spec import AccelerateSpec, TrainSpec
from tasks.state import PROJECT_ROOT, is_complete, mark_complete, sha256_dir
from tasks.trainer import latest_checkpoint
from tasks.tracking import RunContext, flatten_params, log_dir_files, stage_run

log = logging.getLogger(__name__)
PID_FILE = "trainer.pid"
MLFLOW_RUN_FILE = "mlflow_run.json"


class TrainingError(RuntimeError):
    """Training failed on the way (crash, kill, out of memory): the task retries and resumes."""


class TrainingConfigError(ValueError):
    """A config that cannot train with this model, data or hardware: retrying cannot help."""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def runs_on_cpu(acc: AccelerateSpec) -> bool:
    return acc.cpu if acc.cpu is not None else not cuda_available()


def launch_command(acc: AccelerateSpec, args_file: Path, use_cpu: bool | None = None) -> list[str]:
    """The ``accelerate launch`` command line for a training run."""
    use_cpu = runs_on_cpu(acc) if use_cpu is None else use_cpu
    try:
        profile = profile_named(acc.profile)
    except PlanError as e:
        raise TrainingConfigError(str(e)) from None
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if acc.profile:
        cmd += ["--config_file", str(ACCELERATE_CONFIGS / f"{acc.profile}.yaml")]
    cmd += ["--num_processes", str(acc.num_processes), "--num_machines", str(acc.num_machines)]
    if (profile.kind != "single" or acc.num_processes > 1) and acc.num_machines == 1:
        cmd += ["--main_process_port", "0"]   # a free port: runs side by side on one machine do not collide
    if use_cpu and profile.kind == "deepspeed":
        # --cpu would switch DeepSpeed off; on a machine without CUDA it runs on the CPU with gloo, in fp32
        cmd += ["--mixed_precision", "no"]
    elif use_cpu:
        cmd += ["--cpu"]
    if not acc.profile:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // acc.num_processes))]
    return cmd + ["-m", "tasks.trainer", "--args", str(args_file)]


# ---------------------------------------------------------------------------------------------
# preflight: everything a retry cannot fix, before any weights load
# ---------------------------------------------------------------------------------------------


def preflight(spec: TrainSpec, model: ModelRef, data: DatasetRef, devices: Devices | None = None) -> str:
    """Raise TrainingConfigError naming every problem; return the memory plan's one-line verdict."""
    problems: list[str] = []
    try:
        profile = profile_named(spec.accelerate.profile)
        if profile.kind == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            problems.append(f"train.accelerate.profile {profile.name!r} needs DeepSpeed, which is not installed. "
                            "Fix: pip install 'llm-gauntlet[gpu]' (on a CPU-only machine: "
                            "DS_BUILD_OPS=0 pip install deepspeed)")
    except PlanError as e:
        problems.append(str(e))
    try:
        shape = model_shape(Path(model.path), model.source)
    except (OSError, ValueError, KeyError) as e:   # an architecture transformers does not know
        shape = None
        log.warning("cannot plan %s from its config.json (%s): model checks skipped", model.source, e)
    if shape:
        problems += check_model_fit(shape, spec)
    fmt = None
    for role, path in (("train", data.train_path), ("validation", data.validation_path)):
        try:
            fmt, _ = check_file(path, spec.data_format)
        except DataFormatError as e:
            problems.append(f"data.{role}: {e}")
    if not problems and fmt == "chat":
        problems += _check_chat_rendering(spec, model, data, fmt)
    if problems:
        raise TrainingConfigError("training cannot start:\n- " + "\n- ".join(problems))
    if spec.memory_check == "off" or shape is None:
        return "memory check off"
    if devices is None:
        devices = host_memory() if runs_on_cpu(spec.accelerate) else visible_devices()
    _, fits, why = check_training_memory(shape, spec, devices)
    if not fits and spec.memory_check == "refuse":
        raise TrainingConfigError(why)
    return why if fits else f"WARNING (train.memory_check=warn): {why}"


def _check_chat_rendering(spec: TrainSpec, model: ModelRef, data: DatasetRef, fmt: str) -> list[str]:
    """Render the first rows with the chat template: template errors surface here, not mid-launch."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model.path)
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    try:
        check_tokenizer(tokenizer, fmt)  # type: ignore[arg-type]
        tokenize_rows(read_jsonl(data.train_path)[:20], fmt, tokenizer, spec.max_seq_len)  # type: ignore[arg-type]
    except DataFormatError as e:
        return [f"train.chat_template: {e}"]
    except Exception as e:  # jinja errors from the template itself
        return [f"train.chat_template: rendering a training row failed: {type(e).__name__}: {e}"]
    return []


# ---------------------------------------------------------------------------------------------
# the launch
# ---------------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen) -> None:
    """Stop every process of the training (its own process group): TERM, then KILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def train_model(spec: TrainSpec, model: ModelRef, data: DatasetRef, out: Path,
                mlflow: dict | None = None, echo: Callable[[str], None] = print) -> TrainedModel:
    """Fine-tune ``model`` on ``data`` into ``out`` (durable); returns the merged model's ref.

    Resumes from the newest checkpoint in ``out`` when an earlier attempt left one.
    """
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "result.json"
    if is_complete(out) and result_file.exists():
        echo(f"training already finished in an earlier attempt: {out}")
    else:
        echo(preflight(spec, model, data))
        _launch(spec, model, data, out, mlflow, echo)
    result = json.loads(result_file.read_text())
    merged_path = Path(result["merged_path"])
    mark_complete(out)
    merged = ModelRef(name=f"{model.name}-ft", path=str(merged_path), source=f"trained-from:{model.source}",
                      revision=model.sha[:12], sha=sha256_dir(merged_path))
    return TrainedModel(base=model, merged=merged, adapter_path=result.get("adapter_path"), output_dir=str(out),
                        metrics=result["metrics"], steps=result["steps"])


def _launch(spec: TrainSpec, model: ModelRef, data: DatasetRef, out: Path, mlflow: dict | None,
            echo: Callable[[str], None]) -> None:
    result_file = out / "result.json"
    result_file.unlink(missing_ok=True)
    use_cpu = runs_on_cpu(spec.accelerate)
    deepspeed = profile_named(spec.accelerate.profile).kind == "deepspeed"
    args = {"base_model": model.path, "train_path": data.train_path, "validation_path": data.validation_path,
            "output_dir": str(out), "cpu": use_cpu and not deepspeed, "train": spec.model_dump(mode="json"),
            "mlflow": mlflow,
            "card": {"name": f"{model.name}-ft", "base_model": model.source, "base_revision": model.revision,
                     "base_sha": model.sha, "data_md5": data.md5, "train_file": data.train_path,
                     "validation_file": data.validation_path}}
    args_file = out / "train_args.json"
    args_file.write_text(json.dumps(args, indent=2))
    resume = latest_checkpoint(out)
    if resume:
        echo(f"resuming from checkpoint {resume}")
    cmd = launch_command(spec.accelerate, args_file, use_cpu)
    echo("launching: " + " ".join(cmd))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    pid_file = out / PID_FILE
    # its own process group, so the whole training (launcher and workers) stops together
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    pid_file.write_text(f"{proc.pid}\n")
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if "%|" not in line:   # progress bars are no help in an error message
                tail.append(line)
            if line.startswith("[trainer]") or "Error" in line:
                echo(line)
        code = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        pid_file.unlink(missing_ok=True)
        if proc.stdout:
            proc.stdout.close()
    if code != 0 or not result_file.exists():
        saved = latest_checkpoint(out)
        where = f"; the retry resumes from {saved.name}" if saved else ""
        raise TrainingError(f"training {_exit_reason(code)}{where}; last lines:\n" + "\n".join(tail))


# ---------------------------------------------------------------------------------------------
# the Prefect task
# ---------------------------------------------------------------------------------------------

TRAIN = Stage("train", modules=("train", "trainer", "prompting", "sft_data", "plan"),
              key_parts=lambda p: [p["spec"].model_dump(mode="json"), p["model"].sha, p["data"].md5])


def _earlier_attempt(out: Path, run: RunContext) -> tuple[str | None, int]:
    """(MLflow run id to continue, attempt number): an attempt of the same flow run is continued."""
    record = out / MLFLOW_RUN_FILE
    if not record.exists():
        return None, 1
    earlier = json.loads(record.read_text())
    if earlier.get("parent_run_id") != run.parent_run_id:
        return None, 1
    return earlier["run_id"], earlier.get("attempt", 1) + 1


@task(name="train", cache_key_fn=TRAIN.cache_key_fn, persist_result=True, retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless(TrainingConfigError))
def train(spec: TrainSpec, model: ModelRef, data: DatasetRef, run: RunContext) -> TrainedModel:
    logger = get_run_logger()
    params = {"spec": spec, "model": model, "data": data}
    out = TRAIN.output_dir(params)
    resume_run_id, attempt = _earlier_attempt(out, run)
    with stage_run(run, "train", {**flatten_params("train", spec.model_dump(mode="json")),
                                  "base_model_sha": model.sha, "data_md5": data.md5},
                   resume_run_id=resume_run_id) as (c, run_id):
        (out / MLFLOW_RUN_FILE).write_text(json.dumps({"run_id": run_id, "parent_run_id": run.parent_run_id,
                                                       "attempt": attempt}))
        c.set_tag(run_id, "gauntlet.attempt", str(attempt))
        if resume_run_id:
            logger.info(f"attempt {attempt}: continuing MLflow run {run_id}")
            earlier_error = c.get_run(run_id).data.tags.get("gauntlet.error")
            if earlier_error:   # keep the earlier attempt's error on record, under its own name
                c.set_tag(run_id, f"gauntlet.attempt_{attempt - 1}.error", earlier_error)
                c.delete_tag(run_id, "gauntlet.error")
        result = train_model(spec, model, data, out, {"tracking_uri": run.tracking_uri, "run_id": run_id},
                             echo=logger.info)
        for k, v in result.metrics.items():   # at the last step, so that the curves end there
            c.log_metric(run_id, k, v, step=result.steps)
        resumed_from = json.loads((out / "result.json").read_text()).get("resumed_from_step", 0)
        if resumed_from:
            c.set_tag(run_id, "gauntlet.resumed_from_step", str(resumed_from))
        log_dir_files(c, run_id, [out / "loss_curve.png", out / "train_args.json", out / "result.json",
                                  out / "steps.jsonl"])
        log_dir_files(c, run_id, [Path(result.merged.path) / "README.md"], "model_card")
        c.set_tag(run_id, "gauntlet.merged_model", result.merged.path)
    logger.info(f"trained {result.steps} steps: {result.metrics}; merged model {result.merged.path}")
    TRAIN.write_receipt(params, [result.merged.path, str(out / "result.json")])
    return result.model_copy(update={"mlflow_run_id": run_id})
