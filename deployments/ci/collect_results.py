"""Collect what a finished flow run published, for CI: its final state, its Prefect markdown artifacts
(the gate decision, the run summary, a leaderboard, …) and, when MLflow is reachable, the JSON its
MLflow run holds (summary.json, and each evaluation's report.json).

Writes into OUT: ``state.json``, one ``<artifact-key>.md`` per markdown artifact, ``mlflow/…`` files,
and ``comment.md`` (a PR comment: verdict line, then the artifacts). Prints ``verdict=<passed|failed|
run-failed|unknown>`` (append it to $GITHUB_OUTPUT in a workflow) and exits 0 when the run completed and
the gate did not fail, 1 otherwise.

Needs only the Prefect client (PREFECT_API_URL, PREFECT_API_KEY) and, optionally, MLflow
(MLFLOW_TRACKING_URI and its credentials) — not the project's dependencies:

    python deployments/ci/collect_results.py FLOW_RUN_ID --out ci-results/demo --title "configs/demo.yaml"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from uuid import UUID

GATE_KEY = "gate-decision"
SUMMARY_KEY = "run-summary"


def prefect_results(flow_run_id: UUID) -> tuple[dict, dict[str, str]]:
    """(state, {artifact key: markdown}) of a flow run, read from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        run = c.read_flow_run(flow_run_id)
        artifacts = c.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    state = {"flow_run_id": str(flow_run_id), "name": run.name, "state": run.state.name if run.state else None,
             "type": run.state.type.value if run.state else None,
             "message": run.state.message if run.state else None}
    markdown: dict[str, str] = {}
    for a in sorted(artifacts, key=lambda a: a.created or 0):
        if a.type == "markdown" and isinstance(a.data, str):
            markdown[a.key or f"artifact-{a.id}"] = a.data  # a later artifact of the same key wins
    return state, markdown


def mlflow_results(flow_run_id: UUID, out: Path) -> list[Path]:
    """summary.json and evaluation report.json files of the MLflow runs tagged with this flow run."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return []
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    experiments = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(experiments, f"tags.`prefect.flow_run_id` = '{flow_run_id}'") if experiments else []
    files: list[Path] = []
    for r in runs:
        names = {a.path for a in c.list_artifacts(r.info.run_id)}
        for wanted in ("summary.json", "report.json", "gate_decision.json", "leaderboard.json"):
            if wanted in names:
                target = out / "mlflow" / (r.info.run_name or r.info.run_id)
                target.mkdir(parents=True, exist_ok=True)
                files.append(Path(download_artifacts(run_id=r.info.run_id, artifact_path=wanted,
                                                     dst_path=str(target))))
    return files


def gate_verdict(state: dict, markdown: dict[str, str], mlflow_files: list[Path]) -> str:
    if state.get("type") != "COMPLETED":
        return "run-failed"
    for f in mlflow_files:
        if f.name == "summary.json":
            return "passed" if json.loads(f.read_text()).get("gate_passed") else "failed"
    gate = markdown.get(GATE_KEY, "")
    match = re.search(r"#\s*Gate\s+(PASSED|FAILED)", gate)
    return match.group(1).lower() if match else "unknown"


def comment(title: str, state: dict, verdict: str, markdown: dict[str, str], ui_url: str | None) -> str:
    icon = {"passed": "✅", "failed": "❌", "run-failed": "💥"}.get(verdict, "❔")
    link = f"{ui_url.rstrip('/')}/runs/flow-run/{state['flow_run_id']}" if ui_url else state["flow_run_id"]
    lines = [f"## {icon} {title}: gate {verdict}", "",
             f"Flow run `{state['name']}` ended **{state['state']}** ({link})."]
    if state.get("message") and state.get("type") != "COMPLETED":
        lines += ["", f"> {state['message']}"]
    ordered = [k for k in (GATE_KEY, SUMMARY_KEY) if k in markdown] + sorted(
        k for k in markdown if k not in (GATE_KEY, SUMMARY_KEY))
    for key in ordered:
        lines += ["", "<details open>" if key == GATE_KEY else "<details>", f"<summary>{key}</summary>", "",
                  markdown[key].strip(), "", "</details>"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("flow_run_id", type=UUID)
    parser.add_argument("--out", type=Path, required=True, help="folder for the collected files")
    parser.add_argument("--title", default="Gauntlet", help="heading of the PR comment (e.g. the config path)")
    parser.add_argument("--ui-url", default=os.environ.get("PREFECT_UI_URL"), help="Prefect UI base URL for links")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    state, markdown = prefect_results(args.flow_run_id)
    (args.out / "state.json").write_text(json.dumps(state, indent=2))
    for key, text in markdown.items():
        (args.out / f"{key}.md").write_text(text)
    try:
        mlflow_files = mlflow_results(args.flow_run_id, args.out)
    except Exception as e:  # MLflow is optional here: say so in the log, keep the Prefect results
        print(f"MLflow results not collected: {type(e).__name__}: {e}", file=sys.stderr)
        mlflow_files = []
    verdict = gate_verdict(state, markdown, mlflow_files)
    (args.out / "comment.md").write_text(comment(args.title, state, verdict, markdown, args.ui_url))
    print(f"verdict={verdict}")
    return 0 if verdict in ("passed", "unknown") and state.get("type") == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
