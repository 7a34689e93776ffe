"""The run's summary: what was trained on what, how it scored against its base, what the gate said.

Written as ``summary.md``/``summary.json`` into the parent MLflow run and shown as a Prefect markdown
artifact by the ``summarize`` stage (``tasks/summarize.py``), and returned to the caller (the CLI prints it).
"""

from __future__ import annotations

from pydantic import BaseModel

from gauntlet.eval.scores import find
from gauntlet.eval.stats import paired_difference
from gauntlet.refs import DatasetRef, EvalReport, GateDecision, ModelRef, PromotionResult, QuantizedModel, TrainedModel
from gauntlet.secrets import redact_uri
from gauntlet.tracking import RunContext


class ScoreRow(BaseModel):
    task: str
    metric: str
    base: float | None
    finetuned: float
    ci_low: float | None = None
    ci_high: float | None = None


class VariantRow(BaseModel):
    """One quantized variant beside the unquantized fine-tuned model."""

    variant: str
    method: str
    bits: int
    group_size: int | None
    path: str
    size_mb: float
    size_ratio: float                 # variant size on disk / unquantized fine-tuned size
    tokens_per_s: float | None
    scores: dict[str, float]          # "task.metric" -> score
    deltas: dict[str, float | None]   # "task.metric" -> score - the fine-tuned model's
    comparisons: dict[str, str] = {}  # "task.metric" -> the paired test against the fine-tuned model (Δ, interval)
    registry: str | None = None       # promotion message when gate.register_variants names it


class RunSummary(BaseModel):
    name: str
    mlflow_run_id: str
    tracking_uri: str
    data_md5: str
    base_model: str
    merged_model: str
    train_metrics: dict[str, float]
    scores: list[ScoreRow]
    perf: dict | None
    gate_passed: bool
    gate_reasons: list[str]
    gate_rules: list[tuple[str, str, str]] = []   # every rule: (rule, pass/FAIL/REFUSED, detail with Δ and its interval)
    promotion: str
    registered_version: str | None
    stage_runs: dict[str, str | None]
    finetuned_size_mb: float | None = None
    variants: list[VariantRow] = []
    warnings: list[str] = []                      # what the run could not check (e.g. drift without its reference)

    def markdown(self) -> str:
        lines = [f"# Gauntlet run `{self.name}`", "",
                 f"- data version (DVC md5): `{self.data_md5}`", f"- base model: `{self.base_model}`",
                 f"- fine-tuned model: `{self.merged_model}`",
                 "- training: " + ", ".join(f"{k}={v:.4g}" for k, v in self.train_metrics.items()),
                 *[f"- **warning**: {w}" for w in self.warnings], "",
                 "| task | metric | base | fine-tuned (95% CI) | delta |", "|---|---|---|---|---|"]
        for s in self.scores:
            base = "—" if s.base is None else f"{s.base:.4f}"
            delta = "—" if s.base is None else f"{s.finetuned - s.base:+.4f}"
            ci = "" if s.ci_low is None else f" ({s.ci_low:.4f}…{s.ci_high:.4f})"
            lines.append(f"| {s.task} | {s.metric} | {base} | {s.finetuned:.4f}{ci} | {delta} |")
        if self.perf:
            lines += ["", "speed: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in self.perf.items())]
        lines += ["", f"**gate: {'PASSED' if self.gate_passed else 'FAILED'}**"]
        lines += [f"- {r}" for r in self.gate_reasons]
        if self.gate_rules:
            lines += ["", "| rule | verdict | detail |", "|---|---|---|"]
            lines += [f"| {rule} | {verdict} | {detail} |" for rule, verdict, detail in self.gate_rules]
        lines += ["", f"registry: {self.promotion}"]
        if self.variants:
            lines += self._variants_markdown()
        return "\n".join(lines)

    def _variants_markdown(self) -> list[str]:
        tps = (self.perf or {}).get("tokens_per_s")
        lines = ["", "## Quantized variants", "",
                 "| model | size (MB) | size ratio | tok/s | task | metric | score | delta vs fine-tuned |",
                 "|---|---|---|---|---|---|---|---|"]
        for s in self.scores:
            lines.append(f"| fine-tuned (unquantized) | {_fmt(self.finetuned_size_mb, '.2f')} | 1.00 | {_fmt(tps, '.1f')} "
                         f"| {s.task} | {s.metric} | {s.finetuned:.4f} | — |")
        for v in self.variants:
            for key, value in v.scores.items():
                task, metric = key.split(".", 1)
                lines.append(f"| {v.variant} | {v.size_mb:.2f} | {v.size_ratio:.2f} | {_fmt(v.tokens_per_s, '.1f')} "
                             f"| {task} | {metric} | {value:.4f} | {_fmt(v.deltas.get(key), '+.4f')} |")
        lines += ["", "Against the fine-tuned model, item by item (paired bootstrap):", ""]
        lines += [f"- {v.variant} {key}: {text}" for v in self.variants for key, text in v.comparisons.items()]
        registered = [f"- {v.variant}: {v.registry}" for v in self.variants if v.registry]
        lines += ["", *registered] if registered else []
        return lines


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def variant_rows(report: EvalReport, variants: list[QuantizedModel], reports: list[EvalReport],
                 promotions: dict[str, PromotionResult]) -> list[VariantRow]:
    rows = []
    for q, r in zip(variants, reports, strict=True):
        scores = {f"{s.task}.{s.metric}": s.value for s in r.scores}
        deltas = {f"{s.task}.{s.metric}": None if (before := report.score(s.task, s.metric)) is None
                  else s.value - before for s in r.scores}
        promotion = promotions.get(q.variant)
        comparisons = {}
        for result in r.task_results:  # each task's reported metric, item by item against the parent
            mine, parent = find(r, result.task, result.metric), find(report, result.task, result.metric)
            if mine is not None and parent is not None and mine.items and parent.items:
                comparisons[f"{result.task}.{result.metric}"] = paired_difference(mine.items, parent.items).text()
        rows.append(VariantRow(comparisons=comparisons, variant=q.variant, method=q.method, bits=q.bits, group_size=q.group_size, path=q.path,
                               size_mb=q.size_bytes / 1e6, size_ratio=q.size_ratio,
                               tokens_per_s=r.perf.tokens_per_s if r.perf else None, scores=scores, deltas=deltas,
                               registry=promotion.message if promotion else None))
    return rows


def summarize(name: str, data: DatasetRef, base_model: ModelRef, trained: TrainedModel,
              base_report: EvalReport | None, report: EvalReport, decision: GateDecision,
              promotion: PromotionResult, run: RunContext, variants: list[QuantizedModel] | None = None,
              variant_reports: list[EvalReport] | None = None,
              variant_promotions: dict[str, PromotionResult] | None = None,
              warnings: list[str] | None = None) -> RunSummary:
    variants, variant_reports = variants or [], variant_reports or []
    decision = promotion.decision or decision   # re-gated under the registry lock if the champion changed
    rows = [ScoreRow(task=s.task, metric=s.metric, finetuned=s.value, ci_low=s.ci_low, ci_high=s.ci_high,
                     base=base_report.score(s.task, s.metric) if base_report else None) for s in report.scores]
    return RunSummary(
        name=name, mlflow_run_id=run.parent_run_id, tracking_uri=redact_uri(run.tracking_uri), data_md5=data.md5,
        base_model=f"{base_model.source} ({base_model.sha[:12]})", merged_model=trained.merged.path,
        train_metrics=trained.metrics, scores=rows, perf=report.perf.model_dump() if report.perf else None,
        gate_passed=decision.passed, gate_reasons=decision.reasons, promotion=promotion.message,
        gate_rules=[(r.rule, r.label, r.detail) for r in decision.rules],
        registered_version=promotion.version,
        stage_runs={"fetch_model": base_model.mlflow_run_id, "train": trained.mlflow_run_id,
                    "evaluate_base": base_report.mlflow_run_id if base_report else None,
                    "evaluate": report.mlflow_run_id,
                    **{f"quantize-{q.variant}": q.mlflow_run_id for q in variants},
                    **{f"evaluate-{r.variant}": r.mlflow_run_id for r in variant_reports}},
        finetuned_size_mb=variants[0].base_size_bytes / 1e6 if variants else None,
        variants=variant_rows(report, variants, variant_reports, variant_promotions or {}),
        warnings=warnings or [])
