"""The shape of the code: Prefect only where it belongs, modules a page or so, functions a screen (the wheel:
tests/integration/test_packaging.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.helpers import REPO

PREFECT_ALLOWED = ("gauntlet/cli/", "gauntlet/serve.py")   # the CLI and the server supervisor run flows
LONG = 400   # lines; a longer module says why in its docstring ("long:" …)


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py") if "__pycache__" not in p.parts)


def test_nothing_in_the_library_imports_prefect_but_the_cli_and_the_supervisor() -> None:
    offenders = []
    for path in sources("gauntlet"):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(PREFECT_ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text())):   # inside functions too
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "prefect" or n.startswith("prefect.") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert not offenders, offenders


def test_stages_and_flows_import_the_package_by_its_installed_name() -> None:
    for path in sources("tasks", "flows"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in ("tasks", "flows"), f"{path}: from {node.module}"


def test_deployments_name_flows_by_module_path() -> None:
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    assert {d["entrypoint"] for d in spec["deployments"]} == {"gauntlet.flows.leaderboard:leaderboard",
                                                               "gauntlet.flows.finetune:finetune",
                                                               "gauntlet.flows.leaderboard:leaderboard_job",
                                                               "gauntlet.flows.deploy:deploy",
                                                               "gauntlet.flows.submit:submit"}


def test_no_module_is_long_without_saying_why() -> None:
    long = [f"{p.relative_to(REPO)} ({n} lines)" for p in sources("gauntlet", "tasks", "flows")
            if (n := len(p.read_text().splitlines())) > LONG
            and "long:" not in (ast.get_docstring(ast.parse(p.read_text())) or "").lower()]
    assert not long, long


LONG_FUNCTION = 60   # lines; a longer function says why in its docstring ("long:" …)


def test_no_function_is_long_without_saying_why() -> None:
    long = []
    for path in sources("gauntlet", "tasks", "flows"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONG_FUNCTION and "long:" not in (ast.get_docstring(node) or "").lower():
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
