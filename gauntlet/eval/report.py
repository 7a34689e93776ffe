"""One model's evaluation report: the aggregate of its tasks' results and its speed probe, and its markdown.

The config's ``eval`` section picks a suite (``evals/suites.yaml``) and/or lists tasks; the evaluate stage
(``tasks/evaluate.py``) plans them (:func:`gauntlet.eval.protocol.plans_of`), scores each one as a cached stage
of its own through lm-eval on the ``hf`` or ``vllm`` backend (:func:`gauntlet.eval.engine.run_task`), probes the
model's speed on the same backend (:mod:`gauntlet.eval.speed`), and hands the results to :func:`build_report`:
one :class:`~gauntlet.refs.EvalReport` per model × variant, with per-task scores with stderr, each task's
reported metric normalized between its random baseline and 100 (as the Open LLM Leaderboard does), speed, the
protocol (:mod:`gauntlet.eval.protocol`) and every version, written to ``report.json``. No Prefect and no
cache here.
"""

from __future__ import annotations

import logging
import statistics
from datetime import UTC, datetime
from pathlib import Path

from gauntlet.config.endpoint import EndpointEvalSpec
from gauntlet.config.eval import EvalSpec
from gauntlet.eval.engine import device_kind, engine_model_args, pkg_version
from gauntlet.eval.protocol import engine_protocol, model_fingerprint, protocol_of
from gauntlet.files import write_json
from gauntlet.refs import EvalReport, ModelRef, PerfProbe, PerplexityResult, TaskResult

log = logging.getLogger(__name__)


def build_report(spec: EvalSpec, model: ModelRef, variant: str, results: list[TaskResult],
                 perf: PerfProbe | None, out_dir: Path, device: str | None = None,
                 perplexity: PerplexityResult | None = None) -> EvalReport:
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
    served = isinstance(spec, EndpointEvalSpec)
    usages = [r.usage for r in results if r.usage is not None]
    fingerprint = ({"served": "the server's own generation defaults and chat template"} if served else
                   model_fingerprint(model.path, spec.apply_chat_template, sampled=bool(spec.temperature)))
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
        perplexity=perplexity,
        protocol={**protocol_of(spec), "task_versions": {r.task: r.versions for r in results},
                  "task_effective": {r.task: r.effective for r in results},
                  "model_fingerprint": fingerprint},
        versions=versions,
        timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
        report_path=str(report_path),
        usage=sum(usages[1:], usages[0]) if served and len(usages) == len(results) and usages else None,
    )
    write_json(report_path, report.model_dump(mode="json"), ensure_ascii=False)
    log.info("report written to %s", report_path)
    return report


def report_markdown(report: EvalReport) -> str:
    """The report as a table: each task's reported metric, its stderr and normalized score; then speed."""
    lines = [f"# Evaluation of `{report.model}` ({report.variant})", "",
             f"- suite: {report.suite or '—'}; fixtures: {report.protocol.get('fixtures')}; backend "
             f"{report.protocol.get('backend')} on {report.protocol.get('device')}; lm-eval "
             f"{report.protocol.get('engine_version')}; model sha `{report.model_sha[:12]}`", "",
             "| task | metric | score | ± stderr | 95% CI | random | normalized | shots | n |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(x: float | None, f: str) -> str:
        return "—" if x is None else format(x, f)

    for r in report.task_results:
        primary = next((s for s in r.scores if (s.task, s.metric) == (r.task, r.metric)), None)
        ci = "—" if primary is None or primary.ci_low is None else f"{primary.ci_low:.4f}…{primary.ci_high:.4f}"
        lines.append(f"| {r.task} | {r.metric} | {fmt(r.value, '.4f')} | {fmt(r.stderr, '.4f')} | {ci} | "
                     f"{r.random_baseline:.2f} | {fmt(r.normalized, '.1f')} | {r.num_fewshot} | "
                     f"{sum(r.n_samples.values())} |")
    for r in report.task_results:
        if len(r.repeat_values) > 1:
            sd = statistics.stdev(r.repeat_values)
            lines.append(f"\n{r.task}: {len(r.repeat_values)} repeats (seeds {r.repeat_seeds}): {r.metric} mean "
                         f"{statistics.fmean(r.repeat_values):.4f} ± sd {sd:.4f}; per repeat "
                         + ", ".join(f"{v:.4f}" for v in r.repeat_values))
        if r.changed_items:
            lines.append(f"\n**{r.task}: {len(r.changed_items)} item(s) answered differently across greedy repeats** "
                         f"(not deterministic): {', '.join(r.changed_items[:10])}")
    if report.average_normalized is not None:
        lines += ["", f"**average normalized score: {report.average_normalized:.1f}** (0 = random, 100 = perfect)"]
    if report.perplexity:
        q = report.perplexity
        lines += ["", f"held-out byte perplexity: **{q.byte_perplexity:.4f}** (95% CI {q.ci_low:.4f}…{q.ci_high:.4f}, "
                      f"{q.text} of {q.n} {q.split} rows; {q.bits_per_byte:.4f} bits/byte; lower is better)"]
    if report.perf:
        p = report.perf
        lines += ["", f"speed ({p.backend} on {p.device_name or p.device}): {p.tokens_per_s:.1f} tok/s at batch 1"
                  + (f", {p.tokens_per_s_large_batch:.1f} tok/s at batch {p.large_batch}"
                     if p.tokens_per_s_large_batch is not None else "")
                  + (f"; TTFT p50 {p.ttft_p50_ms:.1f} ms, p95 {p.ttft_p95_ms:.1f} ms"
                     if p.ttft_p50_ms is not None else f"; TTFT {p.first_token_latency_ms:.1f} ms")
                  + ("" if p.peak_memory_gb is None else f"; peak memory {p.peak_memory_gb:.3f} GB")
                  + ("" if p.size_on_disk_gb is None else f"; {p.size_on_disk_gb:.3f} GB on disk")
                  + (f" ({p.note})" if p.note else "")]
    if report.usage:
        u = report.usage
        lines += ["", f"tokens: {u.input_tokens} in, {u.output_tokens} out over {u.requests} requests ({u.how})"]
    return "\n".join(lines)


def load_report(path: str | Path) -> EvalReport:
    """Read a report.json written by the evaluate stage (:func:`build_report`)."""
    return EvalReport.model_validate_json(Path(path).read_text(encoding="utf-8"))
