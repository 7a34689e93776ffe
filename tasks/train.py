"""Stage 3, training: run ``tasks.trainer`` under ``accelerate launch`` as a subprocess.

The task writes the resolved arguments to a JSON file in its durable output folder, launches
``accelerate launch [--config_file deployments/accelerate/<profile>.yaml] -m tasks.trainer``,
streams the trainer's output into the Prefect log, and reads back ``result.json``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

from prefect import get_run_logger, task

from tasks.caching import Stage
from tasks.refs import DatasetRef, ModelRef, TrainedModel
from tasks.spec import AccelerateSpec, TrainSpec
from tasks.state import PROJECT_ROOT, mark_complete, sha256_dir
from tasks.tracking import RunContext, flatten_params, log_dir_files, stage_run

log = logging.getLogger(__name__)
ACCELERATE_CONFIGS = PROJECT_ROOT / "deployments" / "accelerate"


class TrainingError(RuntimeError):
    pass


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_command(acc: AccelerateSpec, args_file: Path) -> list[str]:
    """The ``accelerate launch`` command line for a training run."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if acc.profile:
        config = ACCELERATE_CONFIGS / f"{acc.profile}.yaml"
        if not config.exists():
            known = sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml"))
            raise TrainingError(f"train.accelerate.profile {acc.profile!r}: no {config}; profiles: {known}")
        cmd += ["--config_file", str(config)]
    cmd += ["--num_processes", str(acc.num_processes), "--num_machines", str(acc.num_machines)]
    use_cpu = acc.cpu if acc.cpu is not None else not cuda_available()
    if use_cpu:
        cmd += ["--cpu"]
    if not acc.profile:
        cmd += ["--mixed_precision", "no", "--dynamo_backend", "no",
                "--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // acc.num_processes))]
    return cmd + ["-m", "tasks.trainer", "--args", str(args_file)]


def train_model(spec: TrainSpec, model: ModelRef, data: DatasetRef, out: Path,
                mlflow: dict | None = None, echo: Callable[[str], None] = print) -> TrainedModel:
    """Fine-tune ``model`` on ``data`` into ``out`` (durable); returns the merged model's ref."""
    out.mkdir(parents=True, exist_ok=True)
    use_cpu = spec.accelerate.cpu if spec.accelerate.cpu is not None else not cuda_available()
    args = {"base_model": model.path, "train_path": data.train_path, "validation_path": data.validation_path,
            "output_dir": str(out), "cpu": use_cpu, "train": spec.model_dump(mode="json"), "mlflow": mlflow}
    args_file = out / "train_args.json"
    args_file.write_text(json.dumps(args, indent=2))
    cmd = launch_command(spec.accelerate, args_file)
    echo("launching: " + " ".join(cmd))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    tail: collections.deque[str] = collections.deque(maxlen=40)
    with subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if line.startswith("[trainer]") or "Error" in line:
                echo(line)
        code = proc.wait()
    result_file = out / "result.json"
    if code != 0 or not result_file.exists():
        raise TrainingError(f"training exited with code {code}; last lines:\n" + "\n".join(tail))
    result = json.loads(result_file.read_text())
    merged_path = Path(result["merged_path"])
    mark_complete(out)
    merged = ModelRef(name=f"{model.name}-ft", path=str(merged_path), source=f"trained-from:{model.source}",
                      revision=model.sha[:12], sha=sha256_dir(merged_path))
    return TrainedModel(base=model, merged=merged, adapter_path=result.get("adapter_path"), output_dir=str(out),
                        metrics=result["metrics"], steps=result["steps"])


TRAIN = Stage("train", modules=("train", "trainer", "prompting"),
              key_parts=lambda p: [p["spec"].model_dump(mode="json"), p["model"].sha, p["data"].md5])


@task(name="train", cache_key_fn=TRAIN.cache_key_fn, persist_result=True)
def train(spec: TrainSpec, model: ModelRef, data: DatasetRef, run: RunContext) -> TrainedModel:
    logger = get_run_logger()
    params = {"spec": spec, "model": model, "data": data}
    out = TRAIN.output_dir(params)
    with stage_run(run, "train", {**flatten_params("train", spec.model_dump(mode="json")),
                                  "base_model_sha": model.sha, "data_md5": data.md5}) as (c, run_id):
        result = train_model(spec, model, data, out, {"tracking_uri": run.tracking_uri, "run_id": run_id},
                             echo=logger.info)
        for k, v in result.metrics.items():
            c.log_metric(run_id, k, v)
        log_dir_files(c, run_id, [out / "loss_curve.png", out / "train_args.json", out / "result.json"])
        c.set_tag(run_id, "gauntlet.merged_model", result.merged.path)
    logger.info(f"trained {result.steps} steps: {result.metrics}; merged model {result.merged.path}")
    TRAIN.write_receipt(params, [result.merged.path, str(out / "result.json")])
    return result.model_copy(update={"mlflow_run_id": run_id})
