"""The finetune flow: one config in, one evaluated, gated and (maybe) promoted model out.

Composition only: every stage is a cached task in ``tasks/``; see docs/architecture.md.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from tasks.checks import CHECK, check_data_task
from tasks.data import DATA, pull_data_task
from tasks.evaluate import evaluate_stage
from tasks.gate import gate, promote
from tasks.models import fetch_model_stage
from tasks.notify import notify_failed_run, notify_outcome
from tasks.registry import register_challenger
from tasks.quantize import QUANTIZE, quantize_task
from tasks.spec import RunSpec, load_spec
from tasks.summary import RunSummary, summarize_task
from tasks.train import TRAIN, train
from tasks.tracking import flatten_params, parent_run, tracking_uri


def run_pipeline(spec: RunSpec) -> RunSummary:
    uri = tracking_uri(spec.tracking.tracking_uri)
    tags = {"prefect.flow_run_id": str(flow_run.id), "gauntlet.config_hash": spec.config_hash(),
            "gauntlet.config_name": spec.name}
    with parent_run(uri, spec.tracking.experiment, f"{spec.name}-{flow_run.name}", tags,
                    flatten_params("", spec.model_dump(mode="json"))) as run:
        data = DATA.run(pull_data_task, spec=spec.data, run=run)
        base = fetch_model_stage(spec.model, run)
        CHECK.run(check_data_task, checks=spec.data.checks, max_seq_len=spec.train.max_seq_len, data=data,
                  model=base, run=run)
        trained = TRAIN.run(train, spec=spec.train, model=base, data=data, run=run)
        base_report = (evaluate_stage(spec.eval, base, data, "base", run)
                       if spec.eval.compare_with_base else None)
        report = evaluate_stage(spec.eval, trained.merged, data, "finetuned", run)
        # Quantized variants are evaluated exactly like the unquantized model.
        variants = [QUANTIZE.run(quantize_task, variant=v, calibration=spec.quantize.calibration,
                                 model=trained.merged, data=data, run=run) for v in spec.quantize.variants]
        variant_reports = [evaluate_stage(spec.eval, q, data, q.variant, run)
                           for q in variants]
        candidate = register_challenger(spec.registry, trained, report, data, spec.config_hash(), run)
        decision = gate(spec.gate, spec.registry, report, base_report, run)
        promotion = promote(spec.registry, spec.gate, decision, candidate, report, base_report, run)
        notify_outcome(spec.notify, spec.registry, promotion, report, base_report, run)
        # A variant named in gate.register_variants goes through the same registration, gate and
        # promotion, as <model_name>-<variant>, when the fine-tuned model itself passed.
        variant_promotions = {}
        for q, q_report in zip(variants, variant_reports, strict=True):
            if decision.passed and q.variant in spec.gate.register_variants:
                registry = spec.registry.model_copy(update={"model_name": f"{spec.registry.model_name}-{q.variant}"})
                q_candidate = register_challenger(registry, trained.model_copy(update={"merged": q}), q_report, data,
                                                  spec.config_hash(), run)
                q_decision = gate(spec.gate, registry, q_report, base_report, run)
                variant_promotions[q.variant] = promote(registry, spec.gate, q_decision, q_candidate, q_report,
                                                        base_report, run)
        return summarize_task(spec.name, data, base, trained, base_report, report, decision, promotion, run,
                              variants, variant_reports, variant_promotions)


@flow(name="finetune", log_prints=True, on_failure=[notify_failed_run], on_crashed=[notify_failed_run])
def finetune(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> RunSummary:
    """Fine-tune, evaluate, gate and promote the model a config describes.

    config: path of a run config (YAML), relative to the project root.
    overrides: dotted-key overrides, e.g. ["train.learning_rate=1e-4"].
    """
    return run_pipeline(load_spec(config, overrides or []))
