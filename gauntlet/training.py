"""Training: run the training program (``gauntlet.programs.trainer``) under ``accelerate launch``.

Before launching, :func:`preflight` checks what a retry cannot fix, without loading any weights: LoRA
target modules the model lacks, a sequence length over the model's limit, training rows without a
response, chat rows without a chat template, and (``train.memory_check``) the planner's memory
estimate against the visible devices (:mod:`gauntlet.plan`). Then :func:`train_model` writes the resolved
arguments (the trainer's ``TrainerArgs``, holding the ``TrainSpec`` itself) to a JSON file in its durable
output folder, launches
``accelerate launch [--config_file deployments/accelerate/<profile>.yaml] -m gauntlet.programs.trainer``
with the launcher every program shares (:mod:`gauntlet.launch`), streams the trainer's output into the
log, and reads back ``result.json``.

Crash and retry: the trainer checkpoints into the same durable folder (``$GAUNTLET_HOME/stages/train/
<key>/checkpoints``), the stage (``tasks/train.py``) retries, and the retry's trainer resumes from the
newest checkpoint. No Prefect here.

``trainer.pid`` in the output folder holds the process-group id of the running training while it
runs (``kill -- -$(cat trainer.pid)`` stops every process of it); it is removed when training ends.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from gauntlet.config.train import AccelerateSpec, TrainSpec
from gauntlet.data.preference import (
    OBJECTIVE_LAYOUT,
    Layout,
    detect_layout,
    layout_mismatch,
    row_problem as preference_row_problem,
)
from gauntlet.data.sft import DataFormatError, check_file, check_tokenizer, read_jsonl, resolve_format, tokenize_rows
from gauntlet.files import is_complete, mark_complete
from gauntlet.hashing import sha256_dir
from gauntlet.launch import ProgramTimeout, launch, write_args
from gauntlet.plan.memory import (
    LOSS_CHUNK_TOKENS,
    Devices,
    accelerate_configs,
    check_training_memory,
    host_memory,
    profile_named,
    visible_devices,
)
from gauntlet.plan.shape import PlanError, check_model_fit, model_shape
from gauntlet.programs import preference_trainer, trainer
from gauntlet.programs.train_kit import CardFacts, MlflowTarget, TrainerArgs
from gauntlet.project import project_root
from gauntlet.refs import DatasetRef, ModelRef, TrainedModel

log = logging.getLogger(__name__)
PID_FILE = "trainer.pid"


class TrainingError(RuntimeError):
    """Training failed on the way (crash, kill, out of memory): the task retries and resumes."""


class TrainingConfigError(ValueError):
    """A config that cannot train with this model, data or hardware: retrying cannot help."""


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def runs_on_cpu(acc: AccelerateSpec) -> bool:
    return acc.cpu if acc.cpu is not None else not cuda_available()


def launch_command(acc: AccelerateSpec, args_file: Path, use_cpu: bool | None = None,
                   program: str = trainer.__name__) -> list[str]:
    """The ``accelerate launch`` command line for a training run of ``program`` (the SFT or the preference one)."""
    use_cpu = runs_on_cpu(acc) if use_cpu is None else use_cpu
    try:
        profile = profile_named(acc.profile)
    except PlanError as e:
        raise TrainingConfigError(str(e)) from None
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if acc.profile:
        cmd += ["--config_file", str(accelerate_configs() / f"{acc.profile}.yaml")]
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
    return cmd + ["-m", program, "--args", str(args_file)]


def program_for(spec: TrainSpec) -> str:
    """The training program's module: TRL's preference trainers for a preference objective, else the SFT one."""
    return preference_trainer.__name__ if spec.is_preference else trainer.__name__


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
    problems += data_problems(spec, data)
    fmt = (None if problems or spec.is_preference
           else resolve_format(spec.data_format, read_jsonl(data.train_path or "")[:1]))
    if fmt == "chat":
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


def data_problems(spec: TrainSpec, data: DatasetRef) -> list[str]:
    """Rows the objective cannot train on: SFT rows under a preference objective or the reverse (naming the fields
    each needs), and rows its own checks refuse (no response; chosen == rejected)."""
    problems = []
    for role, path in (("train", data.train_path), ("validation", data.validation_path)):
        assert path is not None   # a training run's data (DataSpec: train and validation are required) has both
        first = read_jsonl(path)[:1]
        mismatch = first and layout_mismatch(spec.objective, detect_layout(first[0]), f"data.{role} ({path})")
        if mismatch:
            problems.append(mismatch)
        elif spec.is_preference:
            problems += preference_file_problems(path, f"data.{role}", OBJECTIVE_LAYOUT[spec.objective])
        else:
            try:
                check_file(path, spec.data_format)
            except DataFormatError as e:
                problems.append(f"data.{role}: {e}")
    return problems


def preference_file_problems(path: str, role: str, layout: Layout) -> list[str]:
    rows = read_jsonl(path)
    bad = [f"{path}:{i}: {why}" for i, row in enumerate(rows, 1) if (why := preference_row_problem(row, layout))]
    return [f"{role}: {len(bad)} row(s) cannot be used:\n  " + "\n  ".join(bad[:10])] if bad else []


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


def train_model(spec: TrainSpec, model: ModelRef, data: DatasetRef, out: Path,
                mlflow: dict | None = None, echo: Callable[[str], None] = print,
                reference: ModelRef | None = None) -> TrainedModel:
    """Fine-tune ``model`` on ``data`` into ``out`` (durable); returns the merged model's ref. ``reference``: a
    preference objective's reference model when ``train.preference.reference`` names one (else the base).

    Resumes from the newest checkpoint in ``out`` when an earlier attempt left one.
    """
    out.mkdir(parents=True, exist_ok=True)
    result_file = out / "result.json"
    if is_complete(out) and result_file.exists():
        echo(f"training already finished in an earlier attempt: {out}")
    else:
        echo(preflight(spec, model, data))
        _launch(spec, model, data, out, mlflow, echo, reference)
    result = json.loads(result_file.read_text())
    merged_path = Path(result["merged_path"])
    mark_complete(out)
    merged = ModelRef(name=f"{model.name}-ft", path=str(merged_path), source=f"trained-from:{model.source}",
                      revision=model.sha[:12], sha=sha256_dir(merged_path))
    metrics = {**result["metrics"], **preference_gain(result.get("preference_accuracy"))}
    return TrainedModel(base=model, merged=merged, adapter_path=result.get("adapter_path"), output_dir=str(out),
                        metrics=metrics, steps=result["steps"], objective=spec.objective,
                        preference_accuracy=result.get("preference_accuracy"))


def preference_gain(per_pair: dict | None) -> dict[str, float]:
    """The held-out preference accuracy of the base and the trained model (Wilson intervals) and their paired
    difference (paired bootstrap over the same pairs), from the program's per-pair scores; empty without them."""
    if not per_pair or not per_pair.get("base"):
        return {}
    from gauntlet.eval.stats import interval, paired_difference

    base, trained = per_pair["base"], per_pair["trained"]
    b, t = interval(base), interval(trained)
    gain = paired_difference({str(i): v for i, v in enumerate(trained)}, {str(i): v for i, v in enumerate(base)})
    return {"preference_accuracy_base": b.value, "preference_accuracy_base_lo": b.lo,
            "preference_accuracy_base_hi": b.hi, "preference_accuracy": t.value, "preference_accuracy_lo": t.lo,
            "preference_accuracy_hi": t.hi, "preference_accuracy_gain": gain.delta,
            "preference_accuracy_gain_lo": gain.lo, "preference_accuracy_gain_hi": gain.hi,
            "preference_accuracy_gain_significant": float(gain.significant), "preference_pairs": float(gain.n)}


def _launch(spec: TrainSpec, model: ModelRef, data: DatasetRef, out: Path, mlflow: dict | None,
            echo: Callable[[str], None], reference: ModelRef | None = None) -> None:
    use_cpu = runs_on_cpu(spec.accelerate)
    deepspeed = profile_named(spec.accelerate.profile).kind == "deepspeed"
    args = TrainerArgs(
        base_model=model.path, train_path=data.train_path, validation_path=data.validation_path, output_dir=str(out),
        cpu=use_cpu and not deepspeed, train=spec, mlflow=MlflowTarget(**mlflow) if mlflow else None,
        loss_chunk_tokens=LOSS_CHUNK_TOKENS,
        card=CardFacts(name=f"{model.name}-ft", base_model=model.source, base_revision=model.revision,
                       base_sha=model.sha, data_md5=data.md5, train_file=data.train_path,
                       validation_file=data.validation_path),
        reference_model=reference.path if reference else None)
    args_file = write_args(out / "train_args.json", args.model_dump(mode="json"))
    resume = trainer.latest_checkpoint(out)
    if resume:
        echo(f"resuming from checkpoint {resume}")
    cmd = launch_command(spec.accelerate, args_file, use_cpu, program_for(spec))
    echo("launching: " + " ".join(cmd))
    try:
        finished = launch(cmd, cwd=project_root(), env={**os.environ, "PYTHONUNBUFFERED": "1"},
                          result_file=out / "result.json", pid_file=out / PID_FILE, echo=echo,
                          show=lambda line: line.startswith("[trainer]") or "Error" in line,
                          timeout_s=spec.timeout_minutes * 60 if spec.timeout_minutes else None)
    except ProgramTimeout as e:
        raise TrainingError(f"train stage: stopped after train.timeout_minutes={spec.timeout_minutes:g} "
                            f"(the trainer and every worker it started were killed): {e}") from None
    if not finished.ok:
        saved = trainer.latest_checkpoint(out)
        where = f"; the retry resumes from {saved.name}" if saved else ""
        raise TrainingError(f"training {finished.how}{where}; last lines:\n" + finished.last_lines())
