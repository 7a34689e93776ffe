"""Our evaluation wrapper vs lm-eval's own CLI: same model, same suite, same data, same run.

Each side runs in a fresh Python process (imports, model load, data, evaluation, results written),
alternating, ``--repeats`` times; the table shows the median wall time and the ratio ours / CLI
(our overhead; the target is <= 1.05). Both sides evaluate the suite's offline fixtures with the same
few-shot count, limit, batch size and seed; the speed probe is off (the CLI has none).

    python -m benchmarks.eval_overhead                       # en-core fixtures on the demo's tiny model
    python -m benchmarks.eval_overhead --suite zh-core --limit 8 --repeats 3
    python -m benchmarks.eval_overhead --model /path/to/model --device cuda

Note: the CLI indexes lm-eval's whole task catalogue at start (~10 s on a small CPU); our wrapper
indexes only ``evals/`` when every task is a fixture or local task. That fixed cost is part of what is
compared, because it is part of what a user waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ours(args: argparse.Namespace) -> None:
    """Child process: our wrapper (the evaluate stage's library calls) on the suite; prints nothing but lm-eval's
    logs."""
    from benchmarks.library_eval import evaluate_without_stages
    from gauntlet.config.eval import EvalSpec, SpeedProbeSpec
    from gauntlet.refs import ModelRef

    spec = EvalSpec(suite=args.suite, fixtures=True, num_fewshot=args.num_fewshot, limit=args.limit,
                    batch_size=args.batch_size, max_gen_tokens=args.max_gen_tokens,
                    speed_probe=SpeedProbeSpec(enabled=False))
    model = ModelRef(name="bench", path=args.model, source=args.model, sha="benchmark")
    evaluate_without_stages(spec, model, Path(args.out))


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"command failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-4000:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="en-core")
    parser.add_argument("--model", help="model folder (default: the demo's tiny model, built if needed)")
    parser.add_argument("--limit", type=int, default=8)
    parser.add_argument("--num-fewshot", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-gen-tokens", type=int, default=16, help="generation budget (the tiny model: 256 context)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--_ours", dest="ours", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ours:
        _ours(args)
        return 0

    os.environ.setdefault("GAUNTLET_HOME", str(ROOT / ".gauntlet"))
    from gauntlet.config.eval import EvalSpec
    from gauntlet.demo.model import build_demo_model
    from gauntlet.eval.suites import plan_tasks

    model = args.model or str(build_demo_model("tiny-llama"))
    plans = plan_tasks(EvalSpec(suite=args.suite, fixtures=True))
    work = Path(tempfile.mkdtemp(prefix="eval-overhead-"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_DATASETS_CACHE": str(work / "hf-datasets")}
    common = ["--limit", str(args.limit), "--batch-size", str(args.batch_size),
              "--max-gen-tokens", str(args.max_gen_tokens)]
    ours_cmd = [sys.executable, "-m", "benchmarks.eval_overhead", "--_ours", "--suite", args.suite, "--model", model,
                "--num-fewshot", str(args.num_fewshot), *common]
    cli_cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
               "--model_args", f"pretrained={model},dtype={'float32' if args.device == 'cpu' else 'auto'}",
               "--tasks", *[p.engine_task for p in plans], "--include_path", "evals",
               "--num_fewshot", str(args.num_fewshot), "--limit", str(args.limit), "--batch_size",
               str(args.batch_size), "--device", args.device, "--seed", "1234",
               "--gen_kwargs", f"do_sample=False,temperature=0.0,max_gen_toks={args.max_gen_tokens}"]

    _timed(cli_cmd + ["--output_path", str(work / "warm")], env)  # warm the OS file cache and datasets cache
    ours_times, cli_times = [], []
    for i in range(args.repeats):
        ours_times.append(_timed(ours_cmd + ["--out", str(work / f"ours-{i}")], env))
        cli_times.append(_timed(cli_cmd + ["--output_path", str(work / f"cli-{i}")], env))
    ours, cli = statistics.median(ours_times), statistics.median(cli_times)

    # same scores: the benchmark is only meaningful if both sides did the same work
    ours_report = json.loads((work / "ours-0" / "report.json").read_text())
    (cli_file,) = (work / "cli-0").rglob("results_*.json")
    cli_results = json.loads(cli_file.read_text())["results"]
    same = all(abs(t["value"] - cli_results[t["engine_task"]][t["metric"] if "," in t["metric"]
                                                             else f"{t['metric']},none"]) < 1e-9
               for t in ours_report["task_results"])

    print(f"\nsuite {args.suite} (fixtures: {', '.join(p.engine_task for p in plans)}), limit {args.limit}, "
          f"{args.num_fewshot}-shot, batch {args.batch_size}, {args.device}, model {model}")
    print("\n| path | median wall s | runs (s) | ratio vs CLI |")
    print("|---|---|---|---|")
    print(f"| lm-eval CLI (`lm_eval run --model hf`) | {cli:.2f} | {', '.join(f'{t:.2f}' for t in cli_times)} | 1.00 |")
    print(f"| Gauntlet `evaluate_without_stages` | {ours:.2f} | {', '.join(f'{t:.2f}' for t in ours_times)} | "
          f"{ours / cli:.2f} |")
    print(f"\nscores identical: {same}; target ratio <= 1.05: {'met' if ours / cli <= 1.05 else 'NOT met'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
