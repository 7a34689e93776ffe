"""The finetune flow: one config in, one evaluated, gated and (maybe) promoted model out.

Composition only: every stage is a task of ``tasks/``, called with keywords and the flow's MLflow run.
Two entry points run the same pipeline: ``finetune_spec`` takes the validated :class:`RunSpec` (what
``gauntlet run`` hands it: the config is parsed once, by the command), ``finetune`` a config path and overrides
(what ``prefect deployment run`` and the Prefect UI give).
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from gauntlet.config.gate import RegistrySpec
from gauntlet.config.load import load_spec
from gauntlet.config.run import RunSpec
from gauntlet.data.drift import NotMeasured
from gauntlet.eval.preference import with_preference_accuracy
from gauntlet.project import in_project
from gauntlet.refs import DatasetRef, EvalReport, GateDecision, ModelRef, PromotionResult, TrainedModel
from gauntlet.summary import RunSummary
from gauntlet.tasks._flow import flow_parent_run
from gauntlet.tasks.checks import check_data, check_drift
from gauntlet.tasks.data import pull_data
from gauntlet.tasks.evaluate import evaluate
from gauntlet.tasks.gate import gate, promote
from gauntlet.tasks.judge import judge_candidate
from gauntlet.tasks.models import fetch_model, resolve_model
from gauntlet.tasks.notify import notify_failed_run, notify_outcome
from gauntlet.tasks.quantize import quantize
from gauntlet.tasks.register import register_challenger
from gauntlet.tasks.safety import check_safety
from gauntlet.tasks.summarize import summarize
from gauntlet.tasks.train import train
from gauntlet.tracking import RunContext, flatten_params, tracking_uri


def judged(spec: RunSpec, registry: RegistrySpec, candidate: ModelRef, base: ModelRef, report: EvalReport,
           run: RunContext) -> EvalReport:
    """``report`` with the judges' verdicts the config asks for: the win rate against ``registry``'s champion (or
    the base) with ``eval.judge``, the harmful and over-refusal rates with ``eval.safety``."""
    if spec.eval.judge is not None:
        report = judge_candidate(spec=spec.eval.judge, registry=registry, candidate=candidate, base=base,
                                 report=report, run=run)
    if spec.eval.safety is not None:
        report = check_safety(spec=spec.eval.safety, judge=spec.eval.judge, candidate=candidate, report=report,
                              run=run)
    return report


def evaluated(spec: RunSpec, base: ModelRef, trained: TrainedModel, data: DatasetRef,
              run: RunContext) -> tuple[EvalReport | None, EvalReport]:
    """The base's report (with eval.compare_with_base) and the trained model's, each with its held-out preference
    accuracy where the objective measured one (the train stage's, per pair: what gate.min_preference_gain reads)."""
    base_report = (with_preference_accuracy(evaluate(spec=spec.eval, model=base, data=data, variant="base", run=run),
                                            trained, "base") if spec.eval.compare_with_base else None)
    report = evaluate(spec=spec.eval, model=trained.merged, data=data, variant="finetuned", run=run)
    return base_report, with_preference_accuracy(report, trained, "trained")


def register_gate_promote(spec: RunSpec, registry: RegistrySpec, trained: TrainedModel, report: EvalReport,
                          base_report: EvalReport | None, data: DatasetRef,
                          run: RunContext) -> tuple[GateDecision, PromotionResult]:
    """One candidate registered (@challenger) under ``registry``, gated and, if it passes, promoted."""
    candidate = register_challenger(registry=registry, trained=trained, report=report, data=data,
                                    config_hash=spec.config_hash(), run=run)
    decision = gate(spec=spec.gate, registry=registry, report=report, base=base_report, run=run)
    promotion = promote(registry=registry, gate_spec=spec.gate, decision=decision, candidate=candidate,
                        report=report, base=base_report, run=run)
    return decision, promotion


def run_pipeline(spec: RunSpec) -> RunSummary:
    tags = {"gauntlet.config_hash": spec.config_hash(),
            "gauntlet.config_name": spec.name}
    with flow_parent_run(tracking_uri(spec.tracking.tracking_uri), spec.tracking.experiment, f"{spec.name}-{flow_run.name}",
                    tags, flatten_params("", spec.model_dump(mode="json"))) as run:
        data = pull_data(spec=spec.data, run=run)
        base = fetch_model(resolved=resolve_model(spec=spec.model, run=run), run=run)
        check_data(checks=spec.data.checks, max_seq_len=spec.train.max_seq_len, data=data, model=base, run=run)
        drift = check_drift(checks=spec.data.checks, registry=spec.registry, data=data, run=run)  # vs the champion's data
        warnings = [f"drift not measured: {drift.reason}"] if isinstance(drift, NotMeasured) and drift.warning else []
        trained = train(spec=spec.train, model=base, data=data, run=run)
        base_report, report = evaluated(spec, base, trained, data, run)
        report = judged(spec, spec.registry, trained.merged, base, report, run)
        # Quantized variants are evaluated exactly like the unquantized model.
        variants = [quantize(variant=v, calibration=spec.quantize.calibration, model=trained.merged, data=data,
                             run=run) for v in spec.quantize.variants]
        variant_reports = [evaluate(spec=spec.eval, model=q, data=data, variant=q.variant, run=run) for q in variants]
        decision, promotion = register_gate_promote(spec, spec.registry, trained, report, base_report, data, run)
        notify_outcome(spec=spec.notify, registry=spec.registry, promotion=promotion, report=report, base=base_report,
                       run=run)
        # A variant named in gate.register_variants, when the fine-tuned model itself passed, is judged, registered,
        # gated and promoted like it, as <model_name>-<variant> (judged against that name's champion).
        variant_promotions = {}
        for i, q in enumerate(variants):
            if decision.passed and q.variant in spec.gate.register_variants:
                registry = spec.registry.model_copy(update={"model_name": f"{spec.registry.model_name}-{q.variant}"})
                variant_reports[i] = judged(spec, registry, q, base, variant_reports[i], run)
                _, variant_promotions[q.variant] = register_gate_promote(
                    spec, registry, trained.model_copy(update={"merged": q}), variant_reports[i], base_report, data,
                    run)
        return summarize(name=spec.name, data=data, base_model=base, trained=trained, base_report=base_report,
                         report=report, decision=decision, promotion=promotion, variants=variants,
                         variant_reports=variant_reports, variant_promotions=variant_promotions, warnings=warnings,
                         run=run)


@flow(name="finetune", log_prints=True, on_failure=[notify_failed_run], on_crashed=[notify_failed_run])
def finetune_spec(spec: RunSpec) -> RunSummary:
    """Fine-tune, evaluate, gate and promote the model a validated run config describes.

    spec: the run config, validated (``gauntlet run`` hands it over; ``gauntlet.config.load.load_spec`` makes one).
    """
    return run_pipeline(spec)


@flow(name="finetune", log_prints=True, on_failure=[notify_failed_run], on_crashed=[notify_failed_run])
def finetune(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> RunSummary:
    """Fine-tune, evaluate, gate and promote the model a config describes.

    config: path of a run config (YAML), relative to the project root.
    overrides: dotted-key overrides, e.g. ["train.learning_rate=1e-4"].
    """
    return run_pipeline(load_spec(in_project(config), overrides or []))
