"""``gauntlet plan CONFIG``: training memory per launch profile, from the model's config.json alone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gauntlet.cli.common import EXIT_FAILED, EXIT_INVALID, EXIT_OK, add_config
from gauntlet.config.load import load_spec


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="estimate training memory per launch profile, without downloading weights",
                       description="Estimate the peak memory of the config's training (weights, LoRA, gradients, "
                                   "optimizer state, activations) under each profile in deployments/accelerate/, "
                                   "from the model's config.json alone, and compare it with the visible GPUs (or "
                                   "the ones declared with --gpus/--gpu-memory). Exit 1 if the configured "
                                   "profile does not fit them.")
    add_config(p, example="train.batch_size=4")
    p.add_argument("--gpus", type=int, default=None, help="plan for this many GPUs instead of the visible ones")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                   help="memory per GPU in GiB, with --gpus (default 80)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    spec = load_spec(Path(args.config).resolve(), args.overrides)
    from gauntlet.plan.memory import declared_devices
    from gauntlet.plan.report import plan_for_spec, render, to_json
    from gauntlet.plan.shape import PlanError

    devices = declared_devices(args.gpus, args.gpu_memory or 80.0) if args.gpus else None
    try:
        plan, problems = plan_for_spec(spec.model, spec.train, devices, args.gpus)
    except PlanError as e:
        print(f"plan: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(to_json(plan, problems) if args.json else render(plan))
    if problems:
        print("\nconfig problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        return EXIT_INVALID
    return EXIT_OK if plan.configured_fits else EXIT_FAILED
