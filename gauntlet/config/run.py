"""A run config (configs/demo.yaml): every section of the finetune flow, and the rules across sections."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from gauntlet.config.base import Strict, check_model_name
from gauntlet.config.data import DataSpec
from gauntlet.config.deploy import DeploySpec
from gauntlet.config.eval import EvalSpec, task_names
from gauntlet.config.gate import GateSpec, RegistrySpec
from gauntlet.config.model import ModelSpec, SourcesSpec
from gauntlet.config.notify import NotifySpec, TrackingSpec
from gauntlet.config.problems import SpecProblem
from gauntlet.config.quantize import QuantizeSpec
from gauntlet.config.train import TrainSpec, data_layout_problems
from gauntlet.hashing import sha256_json


class RunSpec(Strict):
    name: str = Field(..., min_length=1)
    model: ModelSpec
    data: DataSpec
    train: TrainSpec = TrainSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    eval: EvalSpec
    gate: GateSpec = GateSpec()
    registry: RegistrySpec
    tracking: TrackingSpec = TrackingSpec()
    notify: NotifySpec = NotifySpec()
    deploy: DeploySpec = DeploySpec()
    sources: SourcesSpec = SourcesSpec()

    def section_hash(self, section: str) -> str:
        return sha256_json(getattr(self, section).model_dump(mode="json"))

    def config_hash(self) -> str:
        return sha256_json(self.model_dump(mode="json"))


def count_rows(path: Path) -> int:
    """Non-blank lines of a JSON Lines file."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def cross_section_problems(spec: RunSpec, root: Path) -> list[SpecProblem]:
    """Rules that relate two sections (checked after each section is valid on its own)."""
    problems = []
    try:
        check_model_name(spec.registry.model_name)
    except ValueError as e:
        message, _, fix = str(e).partition(" Fix: ")
        problems.append(SpecProblem(path="registry.model_name", message=message, hint=fix))
    refused = spec.sources.refusal(spec.model.source)
    if refused:
        problems.append(SpecProblem(path="model.source", message=refused,
                                    hint="use an allowed source, or add a pattern to sources.allow"))
    names = [v.name for v in spec.quantize.variants]
    unknown = [n for n in spec.gate.register_variants if n not in names]
    if unknown:
        problems.append(SpecProblem(path="gate.register_variants", message=f"no quantize variant named {unknown}",
                                    hint=f"variants defined in quantize.variants: {names}"))
    if spec.gate.max_perplexity_increase is not None and not (spec.eval.perplexity and spec.eval.compare_with_base):
        problems.append(SpecProblem(
            path="gate.max_perplexity_increase",
            message="compares the held-out perplexity of the fine-tuned model with its base's, which this config "
                    "does not measure" + ("" if spec.eval.perplexity else " (no eval.perplexity)")
                    + ("" if spec.eval.compare_with_base else " (eval.compare_with_base is off)"),
            hint="add `perplexity: {split: validation}` to eval: and keep eval.compare_with_base on, or remove the rule"))
    safety_rules = {"max_harmful_rate": spec.gate.max_harmful_rate,
                    "max_over_refusal_rate": spec.gate.max_over_refusal_rate}
    for rule, limit in safety_rules.items():
        if limit is not None and spec.eval.safety is None:
            problems.append(SpecProblem(path=f"gate.{rule}", message="reads the safety rates, which this config does "
                                                                     "not measure (no eval.safety)",
                                        hint="add `safety: {}` (and a judge) to eval:, or remove the rule"))
    calibrated = [v.name for v in spec.quantize.variants if v.calibrated]
    train = Path(root) / spec.data.repo / spec.data.train
    # The data is usually pulled later; when it is already here, a too-small file fails now, not after training.
    if calibrated and train.is_file():
        rows = count_rows(train)
        wanted = spec.quantize.calibration.samples
        if rows < wanted:
            problems.append(SpecProblem(
                path="quantize.calibration.samples",
                message=f"{wanted} calibration samples asked for {calibrated}, but {spec.data.train} has {rows} rows",
                hint=f"set quantize.calibration.samples to at most {rows}"))
    return (problems + data_layout_problems(spec.train, spec.data, root) + gate_metric_problems(spec, root)
            + preference_gate_problems(spec))


def preference_gate_problems(spec: RunSpec) -> list[SpecProblem]:
    """Rules against the starting model where nothing measures their other side: refused before any training."""
    against_base = {"min_gain_over_base": spec.gate.min_gain_over_base,
                    "max_regression_from_base": spec.gate.max_regression_from_base,
                    "min_preference_gain": spec.gate.min_preference_gain}
    unmeasured = [] if spec.eval.compare_with_base else [r for r, limit in against_base.items() if limit is not None]
    problems = []
    for rule in unmeasured:
        problems.append(SpecProblem(path=f"gate.{rule}", message="compares with the starting model's report, which "
                                                                 "this config does not make: eval.compare_with_base "
                                                                 "is off",
                                    hint="keep eval.compare_with_base on, or remove the rule"))
    if spec.gate.min_preference_gain is None:
        return problems
    if spec.train.objective == "sft":
        problems.append(SpecProblem(path="gate.min_preference_gain",
                                    message="reads the held-out preference accuracy, which only a preference "
                                            "objective's training measures; train.objective is sft",
                                    hint="set train.objective (dpo, ipo, simpo, orpo, kto), or remove the rule"))
    elif spec.gate.register_variants:
        problems.append(SpecProblem(
            path="gate.register_variants", message=f"{spec.gate.register_variants} would be gated on "
                                                   "gate.min_preference_gain too, but a quantized variant's held-out "
                                                   "preference accuracy is not measured (only the trained model's)",
            hint="register the variants from a config without gate.min_preference_gain, or drop one of the two"))
    return problems


def gate_metric_problems(spec: RunSpec, root: Path) -> list[SpecProblem]:
    """gate.metric without a filter where an eval task has several filters of that metric: refused now, naming
    them, not found ambiguous after training. (Tasks of lm-eval's own catalogue are checked when scored.)"""
    from gauntlet.eval.suites import filters_a_name_fits, load_catalog

    tasks_dir = Path(root) / spec.eval.tasks_dir
    suite = load_catalog(tasks_dir).suites[spec.eval.suite].tasks if spec.eval.suite else []
    problems = []
    for task in dict.fromkeys(suite + task_names(spec.eval.tasks)):
        filters = filters_a_name_fits(tasks_dir, task, spec.gate.metric)
        if len(filters) > 1:
            problems.append(SpecProblem(
                path="gate.metric", message=f"{spec.gate.metric!r} fits {len(filters)} filters of task {task}: "
                                            f"{', '.join(filters)}",
                hint=f"name one, e.g. gate.metric: '{spec.gate.metric},{filters[0]}'"))
    return problems
