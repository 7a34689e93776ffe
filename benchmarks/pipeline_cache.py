"""Cold vs cached run of the demo pipeline, each in its own process (as a user runs it twice).

    python benchmarks/pipeline_cache.py [--runs 1]

Prints a table: wall time of the first run in a fresh $GAUNTLET_HOME and of the re-run with nothing
changed, and the ratio (the baseline is the cold run, in the same invocation).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed_demo(home: Path) -> float:
    env = {**os.environ, "GAUNTLET_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "gauntlet.cli", "demo"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="repetitions (each with a fresh state folder)")
    args = parser.parse_args()
    cold, warm = [], []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="gauntlet-bench-") as home:
            cold.append(timed_demo(Path(home)))
            warm.append(timed_demo(Path(home)))
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"{'run':<28}{'wall s (median)':>16}{'ratio':>8}")
    print(f"{'demo, cold (baseline)':<28}{c:>16.1f}{1.0:>8.2f}")
    print(f"{'demo, cached re-run':<28}{w:>16.1f}{w / c:>8.2f}")


if __name__ == "__main__":
    main()
