"""One model evaluated with the library calls the evaluate stage makes (``tasks/evaluate.py``: the plans, one
:func:`gauntlet.eval.scoring.run_task` per task on one shared engine, :func:`gauntlet.eval.report.build_report`),
without the Prefect stages, cache and MLflow runs around them: what the benchmarks time as our evaluation.
Production evaluates through the stage (tests/integration/test_evaluate.py)."""

from __future__ import annotations

from pathlib import Path

from gauntlet.config.eval import EvalSpec
from gauntlet.eval.engine import engine_for
from gauntlet.eval.protocol import plans_of
from gauntlet.eval.report import build_report
from gauntlet.eval.scoring import run_task
from gauntlet.refs import EvalReport, ModelRef


def evaluate_without_stages(spec: EvalSpec, model: ModelRef, out: Path) -> EvalReport:
    """Every task of ``spec`` (no speed probe), lm-eval's files under ``out/tasks/<i>``, ``out/report.json``."""
    with engine_for(spec, model) as engine:
        results = [run_task(spec, plan, engine, None, out / "tasks" / str(i)) for i, plan in enumerate(plans_of(spec))]
        return build_report(spec, model, "base", results, None, out, engine.device)
