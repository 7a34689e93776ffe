"""The shape of the code: one installed package, Prefect only where it belongs, modules a page or so."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from tests.helpers import REPO

PREFECT_ALLOWED = ("gauntlet/cli/", "gauntlet/serve.py")   # the CLI and the server supervisor run flows
LONG = 400   # lines; a longer module says why in its docstring ("long:" …)


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_wheel_installs_one_package_named_gauntlet(tmp_path: Path) -> None:
    # built from a copy of the checkout's files: a build/ folder left by an earlier build must not leak in
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "source"
    for rel in files:
        if (REPO / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, source / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"gauntlet"}, top                       # no `tasks`, no `flows` on sys.path
    expected = {f"gauntlet/{p.relative_to(REPO / 'gauntlet').as_posix()}" for p in sources("gauntlet")}
    expected |= {f"gauntlet/{folder}/{p.relative_to(REPO / folder).as_posix()}" for folder in ("tasks", "flows")
                 for p in sources(folder)}
    assert expected <= set(names), sorted(expected - set(names))   # every module, subpackages included
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gauntlet = gauntlet.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


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
                                                               "gauntlet.flows.deploy:deploy"}


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
