"""``gauntlet deploy``: serve a registered version with a canary rollout; ``status``, ``stop``, ``kserve``."""

from __future__ import annotations

import argparse
import sys

from gauntlet.cli.common import EXIT_FAILED, EXIT_INVALID, EXIT_OK, add_overrides, start_environment

ACTIONS = ("status", "stop", "kserve")


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "deploy", help="serve a registered model: canary it behind nginx, watch it, keep it or roll back",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="gauntlet deploy NAME[@alias] [--config C]   run the deploy flow by hand (the `deploy` Prefect "
                    "deployment runs it when @champion moves)\n"
                    "gauntlet deploy status [NAME]                what serves, which versions, which weights, since when\n"
                    "gauntlet deploy stop NAME                    stop the router and both servers\n"
                    "gauntlet deploy kserve NAME[@alias] [--config C]  print the KServe InferenceService (canary) YAML\n\n"
                    "The first deploy of a model serves it as stable. A later one starts the new version as the canary "
                    "and moves traffic by deploy.steps (default 10% → 50% → 100%), watching each step: errors, p50/p95 "
                    "latency and tokens/s against stable, a quality probe (the config's data.eval rows) and input "
                    "drift. A breach puts all traffic back on stable, stops the canary and rolls @champion back "
                    "(recorded in `gauntlet history`). Settings: the deploy: section of --config (docs/deploy.md).")
    p.add_argument("words", nargs="+", metavar="NAME[@alias] | status [NAME] | stop NAME | kserve NAME",
                   help="a registered model (NAME is NAME@champion; NAME/VERSION and models:/… work too), or an action")
    p.add_argument("--config", help="run config whose deploy:, notify: and data: sections are used (default: the "
                                    "deploy defaults, no probe, no drift check)")
    add_overrides(p, "deploy.steps=[{weight: 50, watch_s: 30}, {weight: 100, watch_s: 30}]")
    return p


def run(args: argparse.Namespace) -> int:
    words = args.words
    action = words[0] if words[0] in ACTIONS else "deploy"
    names = words[1:] if action != "deploy" else words
    if len(names) > 1 or (action in ("stop", "kserve", "deploy") and not names):
        print(f"usage: gauntlet deploy {'NAME[@alias]' if action == 'deploy' else action + ' NAME'}", file=sys.stderr)
        return EXIT_INVALID
    from gauntlet.deploy.release import settings

    got = settings(args.config, args.overrides)       # a bad config exits 2 here (SpecError), before any server
    if action == "kserve":
        return kserve(names[0], got)
    from gauntlet.state import configure_environment

    configure_environment()
    if action == "status":
        return status(names[0] if names else None)
    if action == "stop":
        from gauntlet.deploy.rollout import stop_all
        from gauntlet.deploy.servers import ServerError

        try:
            state = stop_all(names[0])
        except ServerError as e:
            print(f"gauntlet deploy stop: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(f"{names[0]}: stopped (router and servers)" if state else f"{names[0]}: nothing deployed")
        return EXIT_OK
    if start_environment(preload=("gauntlet.flows.deploy",)) is None:
        return EXIT_FAILED
    from gauntlet.flows.deploy import deploy

    try:
        print(deploy(model=names[0], config=args.config, overrides=args.overrides))
    except Exception as e:
        print(f"\ndeploy FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def status(name: str | None) -> int:
    from gauntlet.deploy.rollout import deployed_models, load_state, status_lines

    names = [name] if name else deployed_models()
    if not names:
        print("nothing deployed")
    for n in names:
        state = load_state(n)
        print("\n".join(status_lines(state)) if state else f"{n}: nothing deployed")
    return EXIT_OK


def kserve(name: str, got) -> int:
    from gauntlet.deploy.kserve import render_for

    print(render_for(name, got.deploy), end="")
    return EXIT_OK
