"""What kind of requests a planned task makes: lm-eval's ``output_type`` (``generate_until``, ``multiple_choice``,
``loglikelihood``, ``loglikelihood_rolling``), read from its task YAMLs without importing lm-eval. An endpoint that
returns no log-probabilities can only run generation tasks (gauntlet/config/endpoint.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

from gauntlet.eval.suites import EvalTaskPlan, _members, load_catalog, local_tasks, read_yaml


def output_types(plan: EvalTaskPlan, tasks_dir: Path) -> list[str]:
    """The lm-eval output types of a planned task's requests (``generate_until``, ``multiple_choice``, …), from its
    task YAMLs: its own (a group: its members'), else its fixture's (the same prompt and scoring), else lm-eval's
    own YAML (found by its text). Unknown: an empty list."""
    known = local_tasks(tasks_dir)
    name = plan.engine_task
    if name not in known:
        entry = load_catalog(tasks_dir).tasks.get(plan.name)
        name = entry.fixture if entry is not None and entry.fixture in known else name
    found: set[str] = set()
    pending, seen = [name], set()
    while pending:
        current = pending.pop()
        path = known.get(current) or _engine_yaml(current)
        if current in seen or path is None:
            continue
        seen.add(current)
        cfg = read_yaml(path)
        if isinstance(cfg.get("group"), str):
            pending += _members(cfg)
        else:
            found.add(_output_type(path))
    return sorted(found)


def _output_type(path: Path) -> str:
    """A task YAML's ``output_type``, else its include's (lm-eval's default, ``generate_until``, where none has one)."""
    for _ in range(8):   # includes nest a level or two
        cfg = read_yaml(path)
        if "output_type" in cfg:
            return str(cfg["output_type"])
        include = cfg.get("include")
        if not isinstance(include, str) or not (path.parent / include).is_file():
            break
        path = path.parent / include
    return "generate_until"


@functools.lru_cache(maxsize=64)
def _engine_yaml(task: str) -> Path | None:
    """lm-eval's own YAML defining task or group ``task``, found by its text without importing lm-eval; None if none."""
    from importlib.util import find_spec

    spec = find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    lines = (f"task: {task}\n", f"group: {task}\n")
    for path in sorted((Path(list(spec.submodule_search_locations)[0]) / "tasks").rglob("*.yaml")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if any(line in text for line in lines) and task in (read_yaml(path).get("task"), read_yaml(path).get("group")):
            return path
    return None
