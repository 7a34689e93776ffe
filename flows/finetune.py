"""The finetune flow: one config in, one evaluated, gated and (maybe) promoted model out.

Composition only: every stage is a task of ``tasks/``, called with keywords and the flow's MLflow run.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from gauntlet.config.load import load_spec
from gauntlet.config.run import RunSpec
from gauntlet.summary import RunSummary
from gauntlet.project import in_project
from gauntlet.tracking import flatten_params, parent_run, tracking_uri
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


def run_pipeline(spec: RunSpec) -> RunSummary:
    tags = {"prefect.flow_run_id": str(flow_run.id), "gauntlet.config_hash": spec.config_hash(),
            "gauntlet.config_name": spec.name}
    with parent_run(tracking_uri(spec.tracking.tracking_uri), spec.tracking.experiment, f"{spec.name}-{flow_run.name}",
                    tags, flatten_params("", spec.model_dump(mode="json"))) as run:
        data = pull_data(spec=spec.data, run=run)
        base = fetch_model(resolved=resolve_model(spec=spec.model, run=run), run=run)
        check_data(checks=spec.data.checks, max_seq_len=spec.train.max_seq_len, data=data, model=base, run=run)
        check_drift(checks=spec.data.checks, registry=spec.registry, data=data, run=run)   # against the champion's data
        trained = train(spec=spec.train, model=base, data=data, run=run)
        base_report = (evaluate(spec=spec.eval, model=base, data=data, variant="base", run=run)
                       if spec.eval.compare_with_base else None)
        report = evaluate(spec=spec.eval, model=trained.merged, data=data, variant="finetuned", run=run)
        if spec.eval.judge is not None:   # the win rate against the champion (or the base) joins the report
            report = judge_candidate(spec=spec.eval.judge, registry=spec.registry, candidate=trained.merged, base=base,
                                     report=report, run=run)
        if spec.eval.safety is not None:   # harmful compliance and over-refusal, judged with the rubric
            report = check_safety(spec=spec.eval.safety, judge=spec.eval.judge, candidate=trained.merged,
                                  report=report, run=run)
        # Quantized variants are evaluated exactly like the unquantized model.
        variants = [quantize(variant=v, calibration=spec.quantize.calibration, model=trained.merged, data=data,
                             run=run) for v in spec.quantize.variants]
        variant_reports = [evaluate(spec=spec.eval, model=q, data=data, variant=q.variant, run=run) for q in variants]
        candidate = register_challenger(registry=spec.registry, trained=trained, report=report, data=data,
                                        config_hash=spec.config_hash(), run=run)
        decision = gate(spec=spec.gate, registry=spec.registry, report=report, base=base_report, run=run)
        promotion = promote(registry=spec.registry, gate_spec=spec.gate, decision=decision, candidate=candidate,
                            report=report, base=base_report, run=run)
        notify_outcome(spec=spec.notify, registry=spec.registry, promotion=promotion, report=report, base=base_report,
                       run=run)
        # A variant named in gate.register_variants goes through the same registration, gate and
        # promotion, as <model_name>-<variant>, when the fine-tuned model itself passed.
        variant_promotions = {}
        for q, q_report in zip(variants, variant_reports, strict=True):
            if decision.passed and q.variant in spec.gate.register_variants:
                registry = spec.registry.model_copy(update={"model_name": f"{spec.registry.model_name}-{q.variant}"})
                q_candidate = register_challenger(registry=registry, trained=trained.model_copy(update={"merged": q}),
                                                  report=q_report, data=data, config_hash=spec.config_hash(), run=run)
                q_decision = gate(spec=spec.gate, registry=registry, report=q_report, base=base_report, run=run)
                variant_promotions[q.variant] = promote(registry=registry, gate_spec=spec.gate, decision=q_decision,
                                                        candidate=q_candidate, report=q_report, base=base_report,
                                                        run=run)
        return summarize(name=spec.name, data=data, base_model=base, trained=trained, base_report=base_report,
                         report=report, decision=decision, promotion=promotion, variants=variants,
                         variant_reports=variant_reports, variant_promotions=variant_promotions, run=run)


@flow(name="finetune", log_prints=True, on_failure=[notify_failed_run], on_crashed=[notify_failed_run])
def finetune(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> RunSummary:
    """Fine-tune, evaluate, gate and promote the model a config describes.

    config: path of a run config (YAML), relative to the project root.
    overrides: dotted-key overrides, e.g. ["train.learning_rate=1e-4"].
    """
    return run_pipeline(load_spec(in_project(config), overrides or []))
