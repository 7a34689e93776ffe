"""Stage 5, evaluation: one protocol for every model (lm-evaluation-harness), plus a speed probe.

``evaluate_model`` runs the task YAMLs named by ``EvalSpec.tasks`` (files ``<tasks_dir>/<name>.yaml``)
with lm-eval's ``hf`` backend: the same prompts, the same few-shot seed and greedy decoding for every
model. Then, when enabled, a speed probe on the same backend (transformers) measures output tokens/s
at batch 1, time to first token, peak memory and size on disk. The result is an :class:`EvalReport`
written to ``out_dir/report.json``; lm-eval's own results sit beside it (``lm_eval_results.json``,
``lm_eval_samples.jsonl``).

Task YAMLs that read the run's evaluation data say so with ``metadata.uses_run_eval_data: true``;
their ``dataset_kwargs.data_files`` (a placeholder relative to the repository root) is replaced by
the ``eval_data_path`` given here (the DatasetRef's ``eval_path``). Other relative data paths are
resolved against the repository root. Everything runs offline.

No Prefect here: the Prefect task wrapper lives elsewhere.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import resource
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

from prefect import get_run_logger, task

from tasks.caching import Stage
from tasks.prompting import format_prompt
from tasks.refs import DatasetRef, EvalReport, ModelRef, PerfProbe, TaskScore
from tasks.spec import EvalSpec, SpeedProbeSpec
from tasks.state import PROJECT_ROOT, gauntlet_home
from tasks.tracking import RunContext, flatten_params, stage_run

log = logging.getLogger(__name__)

# Stderr of mean-aggregated metrics (acc, exact_match) is closed-form; other aggregations bootstrap.
BOOTSTRAP_ITERS = 1000
LOCAL_DATA_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
GB = 1e9

# The speed probe's fixed prompts (the first ``SpeedProbeSpec.prompts`` are used, cycling if needed).
PROBE_PROMPTS: tuple[str, ...] = tuple(
    format_prompt(instruction, input)
    for instruction, input in (
        ("What is the favourite colour of Kaloter?", ""),
        ("Summarise the following text in one sentence.",
         "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."),
        ("Which colour does Mizuvan like best?", ""),
        ("Translate the sentence into French.", "The weather is nice today."),
        ("Tell me Quidorbel's favourite colour.", ""),
        ("Write a short poem about the sea.", ""),
        ("List three primary colours.", ""),
        ("Explain what a unit test is.", ""),
    )
)


class EvalError(ValueError):
    """An evaluation that cannot run as configured (missing task YAML, missing data file, …)."""


# ---------------------------------------------------------------------------------------------
# protocol and task configs
# ---------------------------------------------------------------------------------------------


def tasks_dir_of(spec: EvalSpec) -> Path:
    path = Path(spec.tasks_dir)
    return path if path.is_absolute() else PROJECT_ROOT / path


def find_task_yaml(tasks_dir: Path, task: str) -> Path:
    """``<tasks_dir>/<task>.yaml`` (or the first ``<task>.yaml`` below it); EvalError if none."""
    direct = tasks_dir / f"{task}.yaml"
    if direct.is_file():
        return direct
    found = sorted(tasks_dir.rglob(f"{task}.yaml")) if tasks_dir.is_dir() else []
    if found:
        return found[0]
    known = sorted(p.stem for p in tasks_dir.rglob("*.yaml")) if tasks_dir.is_dir() else []
    where = f"folder {str(tasks_dir)!r}" + ("" if tasks_dir.is_dir() else " (which does not exist)")
    raise EvalError(f"eval task {task!r}: no task YAML {task}.yaml in {where}; task YAMLs there: {known}")


def protocol_of(spec: EvalSpec) -> dict:
    """The evaluation protocol: everything that must match for two reports to be comparable.

    Includes a hash of each task YAML, so editing a task changes the protocol (and cache keys).
    """
    tasks_dir = tasks_dir_of(spec)
    task_sha = {
        t: hashlib.sha256(find_task_yaml(tasks_dir, t).read_bytes()).hexdigest()[:16] for t in spec.tasks
    }
    return {
        "backend": spec.backend,
        "num_fewshot": spec.num_fewshot,
        "fewshot_seed": spec.fewshot_seed,
        "limit": spec.limit,
        "batch_size": spec.batch_size,
        "apply_chat_template": spec.apply_chat_template,
        "decoding": "greedy",
        "max_gen_tokens": spec.max_gen_tokens,
        "bootstrap_iters": BOOTSTRAP_ITERS,
        "tasks": list(spec.tasks),
        "task_sha": task_sha,
        "speed_probe": spec.speed_probe.model_dump(mode="json"),
    }


def _resolve_data_path(path: str) -> str:
    p = Path(path)
    return str(p if p.is_absolute() else PROJECT_ROOT / p)


def task_config(task: str, tasks_dir: Path, eval_data_path: str | None) -> dict[str, Any]:
    """The task YAML as an lm-eval config dict, with its local data files made absolute.

    A task marked ``metadata.uses_run_eval_data`` reads ``eval_data_path`` (when given) for its test
    split. Raises EvalError when the YAML is missing or a local data file does not exist.
    """
    from lm_eval.tasks._yaml_loader import load_yaml  # resolves include: and !function like lm-eval does

    path = find_task_yaml(tasks_dir, task)
    cfg = load_yaml(path, resolve_func=True)
    if not isinstance(cfg.get("task"), str):
        raise EvalError(f"eval task {task!r}: {path} is not a single-task YAML (groups are not supported)")
    if cfg["task"] != task:
        log.warning("task YAML %s names its task %r; reporting it as %r", path, cfg["task"], task)
    cfg["task"] = task
    if cfg.get("dataset_path") not in LOCAL_DATA_BUILDERS:
        return cfg  # a hub dataset: only usable where the hub (or its cache) is reachable
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    data_files = kwargs.get("data_files")
    if isinstance(data_files, str):
        data_files = {cfg.get("test_split") or "test": data_files}
    data_files = dict(data_files or {})
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    if eval_data_path and meta.get("uses_run_eval_data"):
        split = cfg.get("test_split") or "test"
        log.info("task %s: %s split from %s", task, split, eval_data_path)
        data_files[split] = eval_data_path
    resolved: dict[str, Any] = {}
    for split, files in data_files.items():
        files_list = [files] if isinstance(files, str) else list(files)
        absolute = [_resolve_data_path(f) for f in files_list]
        for f in absolute:
            if not Path(f).is_file():
                hint = ("pass the run's eval data (eval_data_path) or produce it with `dvc repro`"
                        if meta.get("uses_run_eval_data") else "check dataset_kwargs.data_files in the YAML")
                raise EvalError(f"eval task {task!r} ({path}): data file {f} for split {split!r} not found; {hint}")
        resolved[split] = absolute[0] if isinstance(files, str) else absolute
    kwargs["data_files"] = resolved
    # keep the datasets cache with the rest of Gauntlet's state, not in ~/.cache
    kwargs.setdefault("cache_dir", str(gauntlet_home() / "cache" / "hf-datasets"))
    cfg["dataset_kwargs"] = kwargs
    return cfg


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """No hub traffic during evaluation (models and data are local by now)."""
    keys = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(keys)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _pkg_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        try:
            x = float(x)  # numpy scalars
        except (TypeError, ValueError):
            return None
    x = float(x)
    return None if math.isnan(x) or math.isinf(x) else x


def scores_from_results(results: dict) -> list[TaskScore]:
    """One TaskScore per task per metric of lm-eval's ``results``; stderr None where lm-eval says N/A.

    A metric under a filter other than ``none`` is named ``metric,filter`` (as lm-eval prints it).
    """
    scores = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, raw in metrics.items():
            if "," not in key or "_stderr," in key:
                continue  # alias, samples, … and the stderr entries themselves
            metric, _, filt = key.partition(",")
            value = _number(raw)
            if value is None:
                continue
            stderr = _number(metrics.get(f"{metric}_stderr,{filt}"))
            name = metric if filt == "none" else f"{metric},{filt}"
            scores.append(TaskScore(task=task, metric=name, value=value, stderr=stderr))
    return scores


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def run_lm_eval(spec: EvalSpec, model_path: str, eval_data_path: str | None, device: str) -> dict:
    """lm-eval's ``simple_evaluate`` on the hf backend with the spec's protocol; returns its results."""
    tasks_dir = tasks_dir_of(spec)
    configs = [task_config(t, tasks_dir, eval_data_path) for t in spec.tasks]
    if spec.backend != "hf":
        log.warning("backend %r requested; this stage runs lm-eval's hf backend", spec.backend)
    generative = [c["task"] for c in configs if c.get("output_type") == "generate_until"]
    gen_kwargs = ({"do_sample": False, "temperature": 0.0, "max_gen_toks": spec.max_gen_tokens}
                  if generative else None)
    dtype = "float32" if device == "cpu" else "auto"
    with _offline():
        import lm_eval
        from lm_eval.tasks import TaskManager

        # Only our folder is indexed (the built-in catalogue is large and slow to scan).
        manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
        log.info("lm-eval: %s on %s (%s), tasks %s, limit %s, %d-shot",
                 model_path, device, dtype, spec.tasks, spec.limit, spec.num_fewshot)
        t0 = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": model_path, "dtype": dtype},
            tasks=configs,
            num_fewshot=spec.num_fewshot,
            limit=spec.limit,
            batch_size=spec.batch_size,
            device=device,
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=True,
            apply_chat_template=spec.apply_chat_template,
            fewshot_as_multiturn=spec.apply_chat_template,
            gen_kwargs=gen_kwargs,
            task_manager=manager,
            random_seed=spec.fewshot_seed,
            numpy_random_seed=spec.fewshot_seed,
            torch_random_seed=spec.fewshot_seed,
            fewshot_random_seed=spec.fewshot_seed,
        )
        log.info("lm-eval finished in %.1fs", time.perf_counter() - t0)
    if results is None:
        raise EvalError("lm-eval returned no results (not the main process?)")
    return results


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())  # stat() follows hub-cache symlinks


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def probe_speed(model_path: str, probe: SpeedProbeSpec, device: str | None = None) -> PerfProbe:
    """Greedy generation at batch 1 with transformers on the fixed prompts.

    tokens_per_s: generated tokens / generation time (``max_new_tokens`` forced by ``min_new_tokens``);
    first_token_latency_ms: mean time of a one-token generate; peak_memory_gb: peak allocated CUDA
    memory, or on the CPU the process's peak resident set (which includes everything the process did
    before); size_on_disk_gb: the model folder's bytes. GB = 1e9 bytes.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or _device()
    with _offline():
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32 if device == "cpu" else "auto").to(device)
        model.eval()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        prompts = [PROBE_PROMPTS[i % len(PROBE_PROMPTS)] for i in range(probe.prompts)]

        def generate(prompt: str, n: int) -> tuple[int, float]:
            enc = tokenizer(prompt, return_tensors="pt").to(device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                     pad_token_id=pad_id)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return out.shape[1] - enc["input_ids"].shape[1], time.perf_counter() - t0

        generate(prompts[0], 2)  # warm-up (kernels, caches), not measured
        first = [generate(p, 1)[1] for p in prompts]
        runs = [generate(p, probe.max_new_tokens) for p in prompts]
        tokens = sum(n for n, _ in runs)
        seconds = sum(t for _, t in runs)
        if device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _peak_rss_bytes()
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    perf = PerfProbe(
        backend="hf",
        device="cuda" if device.startswith("cuda") else device,
        tokens_per_s=tokens / seconds,
        first_token_latency_ms=1000 * sum(first) / len(first),
        peak_memory_gb=peak / GB,
        size_on_disk_gb=_size_on_disk(Path(model_path)) / GB,
    )
    log.info("speed probe: %.1f tok/s, TTFT %.1f ms, peak %.3f GB, %.4f GB on disk",
             perf.tokens_per_s, perf.first_token_latency_ms, perf.peak_memory_gb, perf.size_on_disk_gb)
    return perf


def evaluate_model(spec: EvalSpec, model: ModelRef, eval_data_path: str | None, out_dir: Path,
                   variant: str = "base") -> EvalReport:
    """Evaluate one model with the spec's protocol; write and return its report.

    Writes ``out_dir/report.json`` (the EvalReport), ``out_dir/lm_eval_results.json`` (lm-eval's
    results, JSON-serialisable part) and ``out_dir/lm_eval_samples.jsonl`` (per-item requests and
    responses). Raises EvalError when a task YAML or a data file is missing.
    """
    out_dir = Path(out_dir)
    protocol = protocol_of(spec)  # fails early, naming the task and folder, if a YAML is missing
    if not Path(model.path).exists():
        raise EvalError(f"model {model.name}: path {model.path} does not exist")
    out_dir.mkdir(parents=True, exist_ok=True)
    device = _device()
    log.info("evaluating %s (%s, sha %s) on %s", model.name, variant, model.sha[:12], device)

    results = run_lm_eval(spec, model.path, eval_data_path, device)
    samples = results.pop("samples", None) or {}
    with open(out_dir / "lm_eval_samples.jsonl", "w", encoding="utf-8") as f:
        for task, rows in samples.items():
            for row in rows:
                f.write(json.dumps(_jsonable({"task": task, **row})) + "\n")
    raw = _jsonable(results)
    (out_dir / "lm_eval_results.json").write_text(json.dumps(raw, indent=2, sort_keys=True))

    scores = scores_from_results(raw)
    for s in scores:
        log.info("  %s %s = %.4f%s", s.task, s.metric, s.value,
                 "" if s.stderr is None else f" ± {s.stderr:.4f}")
    missing = [t for t in spec.tasks if not any(s.task == t for s in scores)]
    if missing:
        raise EvalError(f"lm-eval produced no scores for task(s) {missing}")

    perf = probe_speed(model.path, spec.speed_probe, device) if spec.speed_probe.enabled else None

    import torch
    versions = {
        "lm_eval": _pkg_version("lm_eval"),
        "transformers": _pkg_version("transformers"),
        "torch": torch.__version__,
        "datasets": _pkg_version("datasets"),
        "tasks": {t: str(v) for t, v in (raw.get("versions") or {}).items()},
        "device": device,
        "dtype": "float32" if device == "cpu" else "auto",
    }
    report_path = out_dir / "report.json"
    report = EvalReport(
        model=model.name,
        model_sha=model.sha,
        variant=variant,
        scores=scores,
        perf=perf,
        protocol=protocol,
        versions=versions,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        report_path=str(report_path),
    )
    report_path.write_text(json.dumps(report.model_dump(mode="json"), indent=2))
    log.info("report written to %s", report_path)
    return report


def load_report(path: str | Path) -> EvalReport:
    """Read a report.json written by :func:`evaluate_model`."""
    return EvalReport.model_validate_json(Path(path).read_text())



# ---------------------------------------------------------------------------------------------
# the Prefect task: keyed on (model content, protocol incl. task versions, eval data version)
# ---------------------------------------------------------------------------------------------

EVAL = Stage("evaluate", modules=("evaluate", "prompting"),
             key_parts=lambda p: [p["model"].sha, protocol_of(p["spec"]), p["data"].eval_md5,
                                  p["variant"]])


@task(name="evaluate", cache_key_fn=EVAL.cache_key_fn, persist_result=True, task_run_name="evaluate-{variant}")
def evaluate_task(spec: EvalSpec, model: ModelRef, data: DatasetRef, variant: str, run: RunContext) -> EvalReport:
    logger = get_run_logger()
    params = {"spec": spec, "model": model, "data": data, "variant": variant}
    out = EVAL.output_dir(params)
    with stage_run(run, f"evaluate-{variant}", {**flatten_params("eval", protocol_of(spec)),
                                                "model.sha": model.sha, "variant": variant}) as (c, rid):
        report = evaluate_model(spec, model, data.eval_path, out, variant=variant)
        for s in report.scores:
            c.log_metric(rid, f"{s.task}.{s.metric}", s.value)
        if report.perf:
            for k, v in report.perf.model_dump().items():
                if isinstance(v, float):
                    c.log_metric(rid, f"perf.{k}", v)
        c.log_artifact(rid, report.report_path)
    logger.info(f"{variant}: " + ", ".join(f"{s.task}.{s.metric}={s.value:.4f}" for s in report.scores))
    EVAL.write_receipt(params, [report.report_path])
    return report.model_copy(update={"mlflow_run_id": rid})
