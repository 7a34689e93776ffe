"""Deployments as files: every entrypoint imports and takes its parameters, the nightly schedule and the pull
step, the Dockerfile, the model CI workflow and its results collector. Pools and `gauntlet serve` run in
tests/integration/test_deployments.py."""

from __future__ import annotations

import inspect
import json
import re

import yaml

from tests.helpers import REPO, load_collector, prefect_yaml

PREFECT_YAML = REPO / "deployments" / "prefect.yaml"

DOCKERFILE = REPO / "deployments" / "Dockerfile"

POOLS = REPO / "deployments" / "work-pools"

MODEL_CI = REPO / ".github" / "workflows" / "model-ci.yml"


def step(steps: list[dict], name: str) -> dict:
    return next(s[name] for s in steps if name in s)


def test_every_deployment_entrypoint_imports_and_its_parameters_fit_the_flow(monkeypatch) -> None:
    from prefect.flows import load_flow_from_entrypoint

    monkeypatch.chdir(REPO)  # `prefect deploy` resolves entrypoints from the repository root
    names = set()
    for d in prefect_yaml()["deployments"]:
        flow = load_flow_from_entrypoint(d["entrypoint"])
        names.add(f"{flow.name}/{d['name']}")
        params = inspect.signature(flow.fn).parameters
        given = d.get("parameters", {})
        assert set(given) <= set(params), f"{d['name']}: {set(given) - set(params)} not parameters of {flow.name}"
        if d["work_pool"]["name"] in ("gpu", "serving"):   # a team's pools: each worker runs in its own checkout
            assert d["pull"] == [], d["name"]
        else:
            assert d["work_pool"]["name"] == "process"
        if flow.name == "leaderboard-job":    # its parameters are one job's, given by the leaderboard flow
            continue
        required = {n for n, p in params.items() if p.default is inspect.Parameter.empty}
        assert required <= set(given)
        flow.validate_parameters(given)  # types, as the server enforces them (enforce_parameter_schema)
        assert (REPO / given["config"]).is_file()
    assert names == {"leaderboard/nightly", "finetune/manual", "finetune/ci", "deploy/deploy", "finetune/pool",
                     "leaderboard-job/pool", "submit/manual"}


def test_nightly_schedule_pull_step_and_build_steps() -> None:
    doc = prefect_yaml()
    nightly = next(d for d in doc["deployments"] if d["name"] == "nightly")
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["active"] is True
    assert schedule["timezone"] == "{{ nightly-timezone.stdout }}"
    build = {s["prefect.deployments.steps.run_shell_script"]["id"]: s["prefect.deployments.steps.run_shell_script"]
             for s in doc["build"]}
    assert build["nightly-timezone"]["script"] == 'echo "${GAUNTLET_TIMEZONE:-UTC}"'
    assert build["project-dir"]["script"] == "pwd"
    assert step(doc["pull"], "prefect.deployments.steps.set_working_directory")["directory"] == \
        "{{ project-dir.stdout }}"
    image_pull = doc["definitions"]["pulls"]["in_image"]
    assert step(image_pull, "prefect.deployments.steps.set_working_directory")["directory"] == "/opt/gauntlet"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, args = line.partition(" ")
            out.append((keyword.upper(), " ".join(args.split())))
    return out


def test_dockerfile_builds_what_the_pools_and_pull_step_expect() -> None:
    instructions = dockerfile_instructions()
    assert instructions[0][0] in ("FROM", "ARG") and any(k == "FROM" for k, _ in instructions)
    assert all(k in {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "VOLUME"} for k, _ in instructions)
    workdir = [a for k, a in instructions if k == "WORKDIR"]
    assert workdir == ["/opt/gauntlet"]  # = the image pull step's directory (test above)
    env = " ".join(a for k, a in instructions if k == "ENV")
    docker_env = json.loads((POOLS / "docker-gpu.json").read_text())["variables"]["properties"]["env"]["default"]
    assert f"GAUNTLET_HOME={docker_env['GAUNTLET_HOME']}" in env
    index = {a: i for i, (k, a) in enumerate(instructions)}
    deps = next(i for i, (k, a) in enumerate(instructions) if k == "RUN" and 'pip install ".[${EXTRAS}]"' in a)
    assert index["pyproject.toml README.md ./"] < deps < index[". ."]  # dependencies cached before the code
    for k, a in instructions:
        if k == "COPY" and a != ". .":
            assert all((REPO / src).exists() for src in a.split()[:-1])
    assert "gauntlet --help" in instructions[-2][1] or "gauntlet --help" in instructions[-1][1]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".gauntlet", ".venv", ".git"} <= set(ignored)


def test_model_ci_workflow_runs_the_ci_deployment_and_reports_back() -> None:
    wf = yaml.safe_load(MODEL_CI.read_text())
    on = wf.get("on", wf.get(True))  # PyYAML reads the key `on` as True
    assert on["pull_request"]["paths"] == ["configs/**"]
    assert wf["permissions"]["pull-requests"] == "write"
    for secret in ("PREFECT_API_URL", "PREFECT_API_KEY"):
        assert wf["env"][secret] == f"${{{{ secrets.{secret} }}}}"
    steps = wf["jobs"]["finetune"]["steps"]
    scripts = "\n".join(s.get("run", "") for s in steps)
    assert "prefect deployment run 'finetune/ci'" in scripts and '--param config="$f"' in scripts
    assert "--watch" in scripts and "python -m gauntlet.cli validate" in scripts
    assert "deployments/ci/collect_results.py" in scripts
    assert (REPO / "deployments" / "ci" / "collect_results.py").is_file()
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/upload-artifact@") for u in uses)
    comment = next(s for s in steps if s.get("uses", "").startswith("actions/github-script@"))
    assert "createComment" in comment["with"]["script"] and "comment.md" in comment["with"]["script"]
    tests_wf = yaml.safe_load((REPO / ".github" / "workflows" / "tests.yml").read_text())
    assert any(s.get("run") == ".ci/run" for s in tests_wf["jobs"]["test"]["steps"])


def test_ci_collector_reads_the_gate_verdict_and_writes_the_comment() -> None:
    collect = load_collector()
    done = {"flow_run_id": "f" * 8, "name": "brave-run", "state": "Completed", "type": "COMPLETED", "message": None}
    gate = {"gate-decision": "# Gate FAILED: support-bot\n\n| rule | measured |", "run-summary": "# Gauntlet run"}
    assert collect.gate_verdict(done, gate, []) == "failed"
    assert collect.gate_verdict(done, {"gate-decision": "# Gate PASSED: x"}, []) == "passed"
    assert collect.gate_verdict({**done, "type": "FAILED"}, gate, []) == "run-failed"
    text = collect.comment("configs/support-bot.yaml", done, "failed", gate, "https://prefect.example.com")
    assert text.startswith("## ❌ configs/support-bot.yaml: gate failed")
    assert "https://prefect.example.com/runs/flow-run/ffffffff" in text
    assert text.index("gate-decision") < text.index("run-summary") and "| rule | measured |" in text
