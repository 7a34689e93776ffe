"""The deploy router's cost and its rollback speed: nginx in front of `transformers serve` against the server
directly, and the time from a breach until the weights are back on stable.

1. **Router overhead**: the same bounded load (same prompts in the same order, same concurrency, same number of
   requests, ``gauntlet.deploy.load.generate``) sent straight to the stable server and through the router
   (nginx, all weight on stable), in alternating rounds; the table shows the median requests/s and p95 latency
   of each side and the ratio router / direct (the target is p95 <= 1.05x).
2. **Rollback**: a canary at ``--canary-weight`` percent under the same load; at the "breach" the rollout's
   own move runs (``gauntlet.deploy.rollout.stop_canary``: weights back on stable with a graceful nginx reload,
   then the canary's server stops). Timed: until the new nginx workers serve stable only (the figure the deploy
   flow logs as ``rollback.reload_s``), until the old workers (the canary's weights) have exited, until the
   canary's server is gone, and, from the access log, when the last request the canary answered ended. Target:
   weights back on stable within 10 s. The canary is started again for each repeat.

    python -m benchmarks.deploy_router                          # the demo's tiny model, 200 requests a round
    python -m benchmarks.deploy_router --requests 400 --concurrency 4 --repeats 5
    python -m benchmarks.deploy_router --model /path/to/model   # a transformers folder with a chat template

Everything runs on 127.0.0.1 in a temporary $GAUNTLET_HOME; nginx must be installed (apt-get install nginx).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _model_folder(source: str | None, out: Path, seed: int) -> Path:
    """A servable model folder: ``source`` as is, or the demo's tiny Llama (built with ``seed``) with the
    training prompt as its chat template (as a registered version gets it)."""
    if source:
        return Path(source)
    from gauntlet.demo.model import build_demo_model
    from gauntlet.registry.mlflow_model import chat_template

    folder = build_demo_model("tiny-llama", out=out, seed=seed)
    if not (folder / "chat_template.jinja").is_file():
        (folder / "chat_template.jinja").write_text(chat_template())
    return folder


def _prompts() -> list[str]:
    """The demo's training instructions (what the deploy tests send), or fixed prompts without the data."""
    train = ROOT / "data" / "demo" / "train.jsonl"
    if train.is_file():
        rows = train.read_text().splitlines()
        return [json.loads(line)["instruction"] for line in rows[::max(1, len(rows) // 80)]]
    return [f"What is the colour of item {i}? Answer in one word." for i in range(80)]


def _round(url: str, name: str, prompts: list[str], args: argparse.Namespace):
    from gauntlet.deploy.load import generate
    from gauntlet.deploy.watch import percentile

    result = generate(url, name, prompts, concurrency=args.concurrency, max_requests=args.requests,
                      max_tokens=args.max_tokens)
    if result.failed:
        sys.exit(f"{result.failed} request(s) to {url} failed: {result.failures[:3]}")
    return result.ok / result.seconds, percentile(result.latencies_s, 95), percentile(result.latencies_s, 50)


def overhead(state, name: str, prompts: list[str], args: argparse.Namespace) -> tuple[list, list]:
    direct, routed = [], []
    _round(state.stable.url, name, prompts, args)                     # warm-up, both paths
    _round(f"http://127.0.0.1:{state.router_port}", name, prompts, args)
    for _ in range(args.repeats):
        direct.append(_round(state.stable.url, name, prompts, args))
        routed.append(_round(f"http://127.0.0.1:{state.router_port}", name, prompts, args))
    return direct, routed


def rollback_times(spec, name: str, canary_dir: Path, prompts: list[str], args: argparse.Namespace) -> list[dict]:
    from gauntlet.deploy import rollout
    from gauntlet.deploy.load import generate
    from gauntlet.deploy.router import read_log
    from gauntlet.deploy.servers import pid_alive

    out = []
    for i in range(args.repeats):
        state = rollout.start_release(spec, name, f"canary-{i}", canary_dir, log=lambda *_: None)
        router = rollout.router_of(state)
        offset = router.access_log.stat().st_size if router.access_log.is_file() else 0
        rollout.apply_weights(state, args.canary_weight)
        canary_port, canary_pid = state.canary.port, state.canary.pid
        stop, box = threading.Event(), {}
        # the closures bind this round's objects: a thread that outlives its join() timeout must not
        # read the next round's state
        load = threading.Thread(target=lambda state=state, stop=stop, box=box: box.update(result=generate(
            f"http://127.0.0.1:{state.router_port}", name, prompts, concurrency=args.concurrency,
            max_requests=100000, stop=stop, max_tokens=args.max_tokens)), daemon=True)
        load.start()
        time.sleep(args.canary_seconds)                                # the canary takes its share
        old_workers, gone = router.worker_pids(), {}
        breach = time.time()
        started = time.monotonic()

        def watch_old_workers(old_workers=old_workers, gone=gone, started=started) -> None:
            # until the workers that still had the canary's weights exit
            while any(pid_alive(p) for p in old_workers) and time.monotonic() - started < 60:
                time.sleep(0.005)
            gone["s"] = time.monotonic() - started

        watcher = threading.Thread(target=watch_old_workers, daemon=True)
        watcher.start()
        reload_s = rollout.stop_canary(state)                          # weights back on stable, canary stops
        stopped_s = time.monotonic() - started
        watcher.join(70)
        assert not pid_alive(canary_pid)
        time.sleep(2)                                                  # requests after the breach, on stable
        stop.set()
        load.join(120)
        records, _ = read_log(router.access_log, offset)
        on_canary = [float(r["t"]) for r in records if r.get("upstream", "").endswith(f":{canary_port}")
                     and str(r.get("status")) == "200"]
        after = [r for r in records if float(r["t"]) - float(r.get("request_time", 0)) > breach + reload_s]
        out.append({"reload_s": reload_s, "stopped_s": stopped_s, "old_workers_s": gone.get("s"),
                    "last_canary_answer_s": max(on_canary) - breach if on_canary else None,
                    "canary_answers": len(on_canary),
                    "after": len(after), "after_on_canary": sum(r.get("upstream", "").endswith(f":{canary_port}")
                                                                for r in after),
                    "failed": box["result"].failed})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", help="stable's model folder (default: the demo's tiny Llama, built here)")
    parser.add_argument("--canary-model", help="the canary's model folder (default: the tiny Llama, another seed)")
    parser.add_argument("--requests", type=int, default=200, help="requests per round and side (default 200)")
    parser.add_argument("--concurrency", type=int, default=2, help="client threads (default 2)")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per side, and rollbacks (default 3)")
    parser.add_argument("--canary-weight", type=int, default=50, help="the canary's share before the breach")
    parser.add_argument("--canary-seconds", type=float, default=5.0, help="load on the canary before the breach")
    parser.add_argument("--port", type=int, default=8950, help="router port; the servers take the next two")
    args = parser.parse_args(argv)

    from gauntlet.deploy.router import nginx_binary

    if nginx_binary() is None:
        sys.exit("nginx is not installed (apt-get install nginx)")
    work = Path(tempfile.mkdtemp(prefix="deploy-router-"))
    os.environ["GAUNTLET_HOME"] = str(work / "home")
    from gauntlet.config.deploy import DeploySpec
    from gauntlet.deploy import rollout

    spec = DeploySpec(router_port=args.port, stable_port=args.port + 1, canary_port=args.port + 2,
                      start_timeout_s=300)
    name = "bench"
    stable_dir = _model_folder(args.model, work / "stable", seed=0)
    canary_dir = _model_folder(args.canary_model, work / "canary", seed=1)
    prompts = _prompts()
    try:
        state = rollout.start_release(spec, name, "stable", stable_dir, log=lambda *_: None)
        direct, routed = overhead(state, name, prompts, args)
        rollbacks = rollback_times(spec, name, canary_dir, prompts, args)
    finally:
        rollout.stop_all(name)
    shutil.rmtree(work, ignore_errors=True)

    med = lambda rows, k: statistics.median(r[k] for r in rows)   # noqa: E731
    d_rps, d_p95, d_p50 = (statistics.median(r[k] for r in direct) for k in range(3))
    r_rps, r_p95, r_p50 = (statistics.median(r[k] for r in routed) for k in range(3))
    print(f"\n{args.requests} requests a round, {args.concurrency} concurrent, {args.max_tokens} tokens each, "
          f"{args.repeats} alternating rounds a side after one warm-up; model {args.model or 'demo tiny-llama'}; "
          f"{os.cpu_count()} CPUs")
    print("\n| path | requests/s (median) | p50 s | p95 s (median) | p95 per round (s) | p95 ratio vs direct |")
    print("|---|---|---|---|---|---|")
    print(f"| direct to `transformers serve` | {d_rps:.1f} | {d_p50:.3f} | {d_p95:.3f} | "
          f"{', '.join(f'{r[1]:.3f}' for r in direct)} | 1.00 |")
    print(f"| through nginx (all weight on stable) | {r_rps:.1f} | {r_p50:.3f} | {r_p95:.3f} | "
          f"{', '.join(f'{r[1]:.3f}' for r in routed)} | {r_p95 / d_p95:.2f} |")
    print(f"\nrequests/s ratio router / direct: {r_rps / d_rps:.2f}; target p95 ratio <= 1.05: "
          f"{'met' if r_p95 / d_p95 <= 1.05 else 'NOT met'}")

    print(f"\nrollback from a canary at {args.canary_weight}% under the same load ({args.repeats} times):")
    print("\n| repeat | new workers serve stable only, s | old workers gone, s | canary server stopped, s "
          "| last canary answer after breach, s | canary answers before | requests after the reload "
          "| of them on the canary | failed requests |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(rollbacks, 1):
        last = f"{r['last_canary_answer_s']:.3f}" if r["last_canary_answer_s"] is not None else "-"
        old = f"{r['old_workers_s']:.3f}" if r["old_workers_s"] is not None else "-"
        print(f"| {i} | {r['reload_s']:.3f} | {old} | {r['stopped_s']:.2f} | {last} | {r['canary_answers']} | "
              f"{r['after']} | {r['after_on_canary']} | {r['failed']} |")
    worst = max(max(r["reload_s"], r["old_workers_s"] or 0) for r in rollbacks)
    print(f"\nweights back on stable (new workers): median {med(rollbacks, 'reload_s'):.3f} s; every worker on the "
          f"new weights, worst {worst:.3f} s; target <= 10 s: {'met' if worst <= 10 else 'NOT met'}")
    late = sum(r["after_on_canary"] for r in rollbacks)
    if late:
        print(f"{late} request(s) that started after the reload still reached the canary (an old worker had "
              "accepted them before it closed its listener)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
