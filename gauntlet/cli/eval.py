"""``gauntlet eval MODEL --suite S``: evaluate one model (a folder, hf://… or models:/…) on a suite."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gauntlet.cli.common import EXIT_FAILED, EXIT_OK, start_environment
from gauntlet.config.load import load_eval_request
from gauntlet.files import write_text


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate one model on a suite (cached per task)",
                       description="Evaluate a model folder, hub model (hf://org/name@revision) or registered "
                                   "model (models:/NAME@alias, models:/NAME/VERSION) with lm-eval on a "
                                   "suite of evals/suites.yaml and/or listed tasks; print and save the report. "
                                   "Tasks evaluated before on the same model with the same protocol come from "
                                   "the cache.")
    p.add_argument("model", help="model folder (save_pretrained layout), hf://org/name@revision, or "
                                 "models:/NAME@alias (the MLflow Model Registry, e.g. models:/gauntlet-demo@champion)")
    p.add_argument("--suite", help="suite name: en-core, zh-core, reasoning, demo (see evals/suites.yaml)")
    p.add_argument("--task", dest="tasks", action="append", default=[], metavar="NAME",
                   help="a task to evaluate (with or instead of a suite; repeatable)")
    p.add_argument("--fixtures", action="store_true",
                   help="use each task's small offline fixture instead of the real dataset (no network)")
    p.add_argument("--variant", default="base", help="label of this model in the report (default: base)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an eval setting by key, e.g. limit=20, backend=vllm, num_fewshot=0 (repeatable)")
    p.add_argument("--opponent", metavar="SOURCE",
                   help="with a judge (--set 'judge={model: …}'), the model the answers are judged against: its win "
                        "rate (a folder, hf://…, models:/NAME@alias); the safety rates (--set 'safety={}') need none")
    p.add_argument("--output", metavar="FILE", help="also write the report JSON here")
    return p


def run(args: argparse.Namespace) -> int:
    model, spec, opponent = load_eval_request(args.model, args.suite, args.tasks, args.fixtures, args.overrides,
                                              args.opponent)
    from gauntlet.eval.engine import engine_modules

    if start_environment(preload=("gauntlet.flows.evaluate", *engine_modules(spec))) is None:
        return EXIT_FAILED
    from gauntlet.eval.report import report_markdown
    from gauntlet.flows.evaluate import evaluate_flow

    try:
        report = evaluate_flow(model=model, spec=spec, variant=args.variant, opponent=opponent)
    except Exception as e:
        print(f"\nevaluation FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print("\n" + report_markdown(report))
    print(f"\nreport: {report.report_path}  (MLflow run {report.mlflow_run_id})")
    if args.output:
        write_text(args.output, Path(report.report_path).read_text(encoding="utf-8"))
        print(f"copied to {args.output}")
    return EXIT_OK
