"""Stage 5, evaluation: one protocol for every model (lm-evaluation-harness), plus a speed probe.

The config's ``eval`` section picks a suite (``evals/suites.yaml``) and/or lists tasks; each task is
planned (:func:`tasks.suites.plan_tasks`), run through lm-eval on the ``hf`` or ``vllm`` backend
(:mod:`tasks.eval_engine`), and the model's speed is probed on the same backend (:mod:`tasks.speed`).
The result is one :class:`EvalReport` per model × variant: per-task scores with stderr, each task's
reported metric normalized between its random baseline and 100 (as the Open LLM Leaderboard does),
speed, the protocol and every version, written to ``report.json`` and logged to MLflow.

**The protocol** (:func:`protocol_of`) is everything that must match for two reports to be comparable:
engine and version, backend, device and dtype, greedy decoding, few-shot seed, chat template choice,
batch size, every task's settings (few-shot count, limit, generation budget, content hash) and, in the
report, every task's lm-eval version. :func:`protocol_differences` says where two reports differ; the
leaderboard refuses to rank reports whose protocols differ.

**Caching**: each task is its own Prefect task (``evaluate_task_score``), keyed on (model content hash,
the task and its version/content, the engine protocol, and the run's eval data when the task reads it);
the speed probe is keyed on (model, engine protocol, probe settings); the stage as a whole on all of it.
Re-evaluating an unchanged model on an unchanged suite is one cache hit; adding a task to a suite runs
that task only (the model is loaded only if some task or the probe actually runs).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.transactions import CommitMode, transaction

from tasks.caching import Stage
from tasks.eval_engine import (  # noqa: F401 - re-exported: the stage's public API
    BOOTSTRAP_ITERS,
    EvalError,
    config_from_yaml,
    device_kind,
    dtype_for,
    engine_for,
    engine_model_args,
    find_task_yaml,
    pkg_version,
    run_task,
    scores_from_results,
    task_config,
)
from tasks.refs import DatasetRef, EvalReport, ModelRef, PerfProbe, TaskResult
from tasks.spec import EvalSpec
from tasks.speed import probe_speed
from tasks.suites import EvalTaskPlan, SuiteError, plan_tasks, tasks_dir_of
from tasks.tracking import RunContext, flatten_params, stage_run

log = logging.getLogger(__name__)

# Protocol keys that describe one measurement rather than the conditions two reports share: none.
# Every key takes part in the comparison, so a leaderboard cannot mix protocols by accident.


# ---------------------------------------------------------------------------------------------
# protocol
# ---------------------------------------------------------------------------------------------


def plans_of(spec: EvalSpec) -> list[EvalTaskPlan]:
    """The spec's tasks, planned; EvalError (naming the task and the folder) if one does not resolve."""
    try:
        return plan_tasks(spec)
    except SuiteError as e:
        raise EvalError(str(e)) from None


def task_protocol(plan: EvalTaskPlan) -> dict[str, Any]:
    """What defines one task's measurement (the engine's own tasks are pinned by the engine's version)."""
    return {"engine_task": plan.engine_task, "source": plan.source, "metric": plan.metric,
            "random_baseline": plan.random_baseline, "num_fewshot": plan.num_fewshot, "limit": plan.limit,
            "max_gen_tokens": plan.max_gen_tokens, "content_sha": plan.content_sha}


def engine_protocol(spec: EvalSpec, device: str | None = None) -> dict[str, Any]:
    """The settings every task of an evaluation shares."""
    device = device or device_kind()
    protocol = {
        "engine": "lm-eval",
        "engine_version": pkg_version("lm_eval"),
        "backend": spec.backend,
        "device": device,
        "dtype": dtype_for(device) if spec.backend == "hf" else "auto",
        "decoding": "greedy",
        "temperature": 0.0,
        "fewshot_seed": spec.fewshot_seed,
        "apply_chat_template": spec.apply_chat_template,
        "batch_size": spec.batch_size,
        "bootstrap_iters": BOOTSTRAP_ITERS,
    }
    if spec.backend == "vllm":
        protocol["max_model_len"] = spec.max_model_len
    return protocol


def protocol_of(spec: EvalSpec) -> dict:
    """The evaluation protocol: everything that must match for two reports to be comparable.

    The report adds ``task_versions`` (lm-eval's version of each task and subtask, known after the run).
    """
    plans = plans_of(spec)
    return {
        **engine_protocol(spec),
        "fixtures": spec.fixtures,
        "suite": spec.suite,
        "num_fewshot": spec.num_fewshot,
        "limit": spec.limit,
        "max_gen_tokens": spec.max_gen_tokens,
        "tasks": [p.name for p in plans],
        "task_settings": {p.name: task_protocol(p) for p in plans},
        "speed_probe": spec.speed_probe.model_dump(mode="json"),
    }


def _protocol(obj: EvalReport | dict) -> dict:
    return obj.protocol if isinstance(obj, EvalReport) else obj


def protocol_differences(a: EvalReport | dict, b: EvalReport | dict) -> list[str]:
    """Where two reports' (or protocols') evaluation protocols differ: ``key: a != b`` per difference."""
    pa, pb = _protocol(a), _protocol(b)
    out = []

    def walk(x: Any, y: Any, path: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k, "<absent>"), y.get(k, "<absent>"), f"{path}.{k}" if path else str(k))
        elif x != y:
            out.append(f"{path}: {x!r} != {y!r}")

    walk(pa, pb, "")
    return out


def protocols_match(a: EvalReport | dict, b: EvalReport | dict) -> bool:
    """True when two reports were measured the same way and may be ranked together."""
    return not protocol_differences(a, b)


def require_same_protocol(reports: list[EvalReport]) -> None:
    """EvalError naming each report and difference when the reports were not all measured the same way."""
    if not reports:
        return
    first = reports[0]
    problems = [f"{r.model} ({r.variant}) vs {first.model} ({first.variant}): " + "; ".join(diff[:5])
                + (f"; … {len(diff) - 5} more" if len(diff) > 5 else "")
                for r in reports[1:] if (diff := protocol_differences(first, r))]
    if problems:
        raise EvalError("reports measured with different protocols cannot be ranked together: " + " | ".join(problems))


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def build_report(spec: EvalSpec, model: ModelRef, variant: str, results: list[TaskResult],
                 perf: PerfProbe | None, out_dir: Path, device: str | None = None) -> EvalReport:
    """Aggregate the tasks' results and the probe into the report; write ``out_dir/report.json``."""
    import torch

    device = device or device_kind()
    normalized = {r.task: r.normalized for r in results if r.normalized is not None}
    versions = {
        "lm_eval": pkg_version("lm_eval"),
        "transformers": pkg_version("transformers"),
        "torch": torch.__version__,
        "datasets": pkg_version("datasets"),
        "tasks": {name: v for r in results for name, v in r.versions.items()},
        "device": device,
        "dtype": engine_protocol(spec, device)["dtype"],
        "engine_args": {k: v for k, v in engine_model_args(spec, model.path, device)[1].items() if k != "pretrained"},
    }
    if spec.backend == "vllm":
        versions["vllm"] = pkg_version("vllm")
    report_path = Path(out_dir) / "report.json"
    report = EvalReport(
        model=model.name,
        model_sha=model.sha,
        variant=variant,
        suite=spec.suite,
        scores=[s for r in results for s in r.scores],
        task_results=results,
        normalized=normalized,
        average_normalized=statistics.fmean(normalized.values()) if normalized else None,
        perf=perf,
        protocol={**protocol_of(spec), "task_versions": {r.task: r.versions for r in results}},
        versions=versions,
        timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        report_path=str(report_path),
    )
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report.model_dump(mode="json"), indent=2, ensure_ascii=False), encoding="utf-8")
    log.info("report written to %s", report_path)
    return report


def _task_folder(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def evaluate_model(spec: EvalSpec, model: ModelRef, eval_data_path: str | None, out_dir: Path,
                   variant: str = "base") -> EvalReport:
    """Evaluate one model with the spec's protocol (every task, then the probe); write and return its report.

    Writes ``out_dir/report.json`` and, per task, ``out_dir/tasks/<task>/lm_eval_results.json`` and
    ``lm_eval_samples.jsonl``. Raises EvalError when a task does not resolve, a data file is missing or
    the model does not load. No Prefect and no cache: :func:`evaluate_task` is the cached stage.
    """
    out_dir = Path(out_dir)
    plans = plans_of(spec)  # fails early, naming the task and folder
    if not Path(model.path).exists():
        raise EvalError(f"model {model.name}: path {model.path} does not exist")
    log.info("evaluating %s (%s, sha %s): %s", model.name, variant, model.sha[:12], [p.name for p in plans])
    with engine_for(spec, model) as engine:
        results = [run_task(spec, plan, engine, eval_data_path, out_dir / "tasks" / _task_folder(plan.name))
                   for plan in plans]
        perf = probe_speed(engine, spec.speed_probe) if spec.speed_probe.enabled else None
        return build_report(spec, model, variant, results, perf, out_dir, engine.device)


def report_markdown(report: EvalReport) -> str:
    """The report as a table: each task's reported metric, its stderr and normalized score; then speed."""
    lines = [f"# Evaluation of `{report.model}` ({report.variant})", "",
             f"- suite: {report.suite or '—'}; fixtures: {report.protocol.get('fixtures')}; backend "
             f"{report.protocol.get('backend')} on {report.protocol.get('device')}; lm-eval "
             f"{report.protocol.get('engine_version')}; model sha `{report.model_sha[:12]}`", "",
             "| task | metric | score | ± stderr | random | normalized | shots | n |", "|---|---|---|---|---|---|---|---|"]
    for r in report.task_results:
        fmt = (lambda x, f: "—" if x is None else format(x, f))
        lines.append(f"| {r.task} | {r.metric} | {fmt(r.value, '.4f')} | {fmt(r.stderr, '.4f')} | "
                     f"{r.random_baseline:.2f} | {fmt(r.normalized, '.1f')} | {r.num_fewshot} | "
                     f"{sum(r.n_samples.values())} |")
    if report.average_normalized is not None:
        lines += ["", f"**average normalized score: {report.average_normalized:.1f}** (0 = random, 100 = perfect)"]
    if report.perf:
        p = report.perf
        lines += ["", f"speed ({p.backend} on {p.device_name or p.device}): {p.tokens_per_s:.1f} tok/s at batch 1"
                  + (f", {p.tokens_per_s_large_batch:.1f} tok/s at batch {p.large_batch}"
                     if p.tokens_per_s_large_batch is not None else "")
                  + (f"; TTFT p50 {p.ttft_p50_ms:.1f} ms, p95 {p.ttft_p95_ms:.1f} ms"
                     if p.ttft_p50_ms is not None else f"; TTFT {p.first_token_latency_ms:.1f} ms")
                  + f"; peak memory {p.peak_memory_gb:.3f} GB; {p.size_on_disk_gb:.3f} GB on disk"]
    return "\n".join(lines)


def load_report(path: str | Path) -> EvalReport:
    """Read a report.json written by :func:`evaluate_model` or the stage."""
    return EvalReport.model_validate_json(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------------


def metric_key(task: str, metric: str) -> str:
    """An MLflow metric name (no commas allowed there): ``gsm8k.exact_match/strict-match``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", f"{task}.{metric.replace(',', '/')}")


def log_task_result(c, run_id: str, result: TaskResult) -> None:
    for s in result.scores:
        c.log_metric(run_id, metric_key(s.task, s.metric), s.value)
        if s.stderr is not None:
            c.log_metric(run_id, metric_key(s.task, s.metric + "_stderr"), s.stderr)
    if result.normalized is not None:
        c.log_metric(run_id, metric_key(result.task, "normalized"), result.normalized)


# ---------------------------------------------------------------------------------------------
# the Prefect tasks: one per task of the suite, the probe, and the stage that aggregates them
# ---------------------------------------------------------------------------------------------

_MODULES = ("evaluate", "eval_engine", "suites", "prompting")


def _run_data_md5(p: dict) -> str | None:
    return p["data"].eval_md5 if p.get("data") is not None else None


SCORE = Stage("evaluate_task", modules=_MODULES,
              key_parts=lambda p: [p["model"].sha, engine_protocol(p["spec"]), task_protocol(p["plan"]),
                                   _run_data_md5(p) if p["plan"].uses_run_eval_data else None])
PROBE = Stage("speed_probe", modules=("speed", "eval_engine", "prompting"),
              key_parts=lambda p: [p["model"].sha, engine_protocol(p["spec"]),
                                   p["spec"].speed_probe.model_dump(mode="json")])
EVAL = Stage("evaluate", modules=(*_MODULES, "speed"),
             key_parts=lambda p: [p["model"].sha, protocol_of(p["spec"]), _run_data_md5(p), p["variant"]])


@task(name="evaluate_task_score", cache_key_fn=SCORE.cache_key_fn, persist_result=True,
      task_run_name="score-{variant}-{plan.name}")
def score_task(spec: EvalSpec, plan: EvalTaskPlan, model: ModelRef, data: DatasetRef | None, variant: str,
               run: RunContext) -> TaskResult:
    """One task of the suite on one model (its own cache entry and nested MLflow run)."""
    logger = get_run_logger()
    params = {"spec": spec, "plan": plan, "model": model, "data": data, "variant": variant}
    out = SCORE.output_dir(params)
    with stage_run(run, f"score-{variant}-{plan.name}", {**flatten_params("task", task_protocol(plan)),
                                                         **flatten_params("eval", engine_protocol(spec)),
                                                         "model.sha": model.sha}) as (c, rid):
        with engine_for(spec, model) as engine:
            result = run_task(spec, plan, engine, data.eval_path if data else None, out)
        log_task_result(c, rid, result)
        c.log_artifact(rid, result.results_path)
        c.log_artifact(rid, result.samples_path)
    logger.info(f"{variant} {plan.name}: {plan.metric}={result.value:.4f} "
                f"(normalized {result.normalized:.1f}) in {result.seconds:.1f}s")
    SCORE.write_receipt(params, [result.results_path, result.samples_path])
    return result.model_copy(update={"mlflow_run_id": rid})


@task(name="speed_probe", cache_key_fn=PROBE.cache_key_fn, persist_result=True,
      task_run_name="speed-probe-{variant}")
def probe_task(spec: EvalSpec, model: ModelRef, variant: str, run: RunContext) -> PerfProbe:
    logger = get_run_logger()
    params = {"spec": spec, "model": model, "variant": variant}
    with stage_run(run, f"speed-probe-{variant}", {**flatten_params("speed_probe", spec.speed_probe.model_dump()),
                                                   **flatten_params("eval", engine_protocol(spec)),
                                                   "model.sha": model.sha}) as (c, rid):
        with engine_for(spec, model) as engine:
            perf = probe_speed(engine, spec.speed_probe)
        for k, v in perf.model_dump().items():
            if isinstance(v, float):
                c.log_metric(rid, f"perf.{k}", v)
    logger.info(f"{variant}: {perf.tokens_per_s:.1f} tok/s (batch 1), {perf.tokens_per_s_large_batch:.1f} tok/s "
                f"(batch {perf.large_batch}), TTFT p50 {perf.ttft_p50_ms:.1f} ms")
    PROBE.write_receipt(params, [])
    return perf


@task(name="evaluate", cache_key_fn=EVAL.cache_key_fn, persist_result=True, task_run_name="evaluate-{variant}")
def evaluate_task(spec: EvalSpec, model: ModelRef, data: DatasetRef | None, variant: str,
                  run: RunContext) -> EvalReport:
    """The evaluation stage: every task (each cached on its own), the probe, one report."""
    from mlflow.entities import Param

    logger = get_run_logger()
    params = {"spec": spec, "model": model, "data": data, "variant": variant}
    with stage_run(run, f"evaluate-{variant}", {"model.sha": model.sha, "variant": variant}) as (c, rid):
        plans = plans_of(spec)  # a task that no longer resolves fails this run, naming the task
        protocol = [Param(k, v[:6000]) for k, v in flatten_params("eval", protocol_of(spec)).items()]
        for i in range(0, len(protocol), 100):  # MLflow takes at most 100 params per batch
            c.log_batch(rid, params=protocol[i:i + 100])
        out = EVAL.output_dir(params)
        nested = run.model_copy(update={"parent_run_id": rid})
        results: list[TaskResult] = []
        # One engine for the stage: loaded on first use only, i.e. only if some task or the probe runs.
        with engine_for(spec, model) as engine:
            for plan in plans:
                # Each task's result is committed to the cache when it is done: a later task's failure
                # must not roll it back (Prefect otherwise commits nested tasks with their parent).
                with transaction(commit_mode=CommitMode.EAGER):
                    result = SCORE.run(score_task, spec=spec, plan=plan, model=model, data=data, variant=variant,
                                       run=nested)
                log_task_result(c, rid, result)  # as they come: a later failure leaves these in the run
                results.append(result)
            with transaction(commit_mode=CommitMode.EAGER):
                perf = (PROBE.run(probe_task, spec=spec, model=model, variant=variant, run=nested)
                        if spec.speed_probe.enabled else None)
            loads = engine.loads
        report = build_report(spec, model, variant, results, perf, out)
        if report.average_normalized is not None:
            c.log_metric(rid, "average_normalized", report.average_normalized)
        if perf:
            for k, v in perf.model_dump().items():
                if isinstance(v, float):
                    c.log_metric(rid, f"perf.{k}", v)
        c.log_metric(rid, "engine_loads", float(loads))
        c.log_artifact(rid, report.report_path)
        markdown = report_markdown(report)
        c.log_text(rid, markdown, "report.md")
    create_markdown_artifact(markdown, key="evaluation-" + re.sub(r"[^a-z0-9-]+", "-", variant.lower()),
                             description=f"evaluation of {model.name} ({variant})")
    logger.info(f"{variant}: " + ", ".join(f"{r.task}.{r.metric}={r.value:.4f}" for r in results)
                + (f"; average normalized {report.average_normalized:.1f}" if report.average_normalized is not None
                   else "") + f"; model loaded {loads}x")
    EVAL.write_receipt(params, [report.report_path])
    return report.model_copy(update={"mlflow_run_id": rid})


def evaluate_stage(spec: EvalSpec, model: ModelRef, data: DatasetRef | None, variant: str, run: RunContext,
                   tags: list[str] | None = None) -> EvalReport:
    """The cached evaluation stage, as flows call it. The cache is keyed on the model's content, not its
    name, so a hit may be a report of the same files under another name (a registry version of a model
    evaluated in its training run): the report returned names the model it was asked about."""
    report = EVAL.run(evaluate_task.with_options(tags=tags) if tags else evaluate_task, spec=spec, model=model,
                      data=data, variant=variant, run=run)
    return report if report.model == model.name else report.model_copy(update={"model": model.name})
