"""Reading configs: YAML in, ``--set`` overrides applied, validated once; SpecError lists every problem."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError

from gauntlet.config.eval import EvalSpec
from gauntlet.config.leaderboard import LeaderboardSpec
from gauntlet.config.model import REGISTRY_SCHEME, ModelSpec
from gauntlet.config.problems import SpecError, SpecProblem, problems_from
from gauntlet.config.run import RunSpec, cross_section_problems
from gauntlet.project import project_root


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; the value is parsed as YAML (``1e-3`` → float)."""
    for item in overrides:
        if "=" not in item:
            raise SpecError("--set", [SpecProblem(path=item, message="override must look like a.b=value")])
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError("--set", [SpecProblem(path=key, message=f"{part!r} is not a section")])
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_spec(path: str | Path, overrides: list[str] | None = None, root: Path | None = None,
              schema: type[BaseModel] = RunSpec) -> Any:
    """Read, override and validate a run config (or another ``schema``). Raises SpecError listing every problem."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise SpecError(source, [SpecProblem(path="(file)", message="config file not found", hint="check the path")])
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SpecError(source, [SpecProblem(path="(file)", message=f"not UTF-8 text: {e}", hint="save as UTF-8")])
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise SpecError(source, [SpecProblem(path=where, message=f"malformed YAML: {getattr(e, 'problem', e)}",
                                             hint="check indentation and quoting near that line")])
    if not isinstance(raw, dict):
        raise SpecError(source, [SpecProblem(path="(top level)", message="config must be a mapping of sections")])
    raw = apply_overrides(raw, overrides or [])
    try:
        spec = schema.model_validate(raw, context={"root": root or project_root()})
    except ValidationError as e:
        raise SpecError(source, problems_from(e, schema)) from None
    problems = cross_section_problems(spec, root or project_root()) if isinstance(spec, RunSpec) else []
    if problems:
        raise SpecError(source, problems)
    return spec


def load_leaderboard_spec(path: str | Path, overrides: list[str] | None = None,
                          root: Path | None = None) -> LeaderboardSpec:
    """Read, override and validate a leaderboard config (configs/leaderboard.yaml)."""
    return load_spec(path, overrides, root, schema=LeaderboardSpec)


def config_kind(path: str | Path) -> Literal["run", "leaderboard"]:
    """A leaderboard config lists candidates; a run config has a model (an unreadable file: 'run', whose
    loader then reports what is wrong with it)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "run"
    return "leaderboard" if isinstance(raw, dict) and "candidates" in raw and "model" not in raw else "run"


def load_eval_request(model: str, suite: str | None, tasks: list[str], fixtures: bool,
                      overrides: list[str]) -> tuple[ModelSpec, EvalSpec]:
    """``gauntlet eval MODEL --suite S --task T --set k=v`` as validated sections; SpecError lists every problem.
    A local folder is taken from the working directory; eval settings are given without the ``eval.`` prefix."""
    raw: dict = {"tasks": list(tasks), "fixtures": bool(fixtures)}
    if suite:
        raw["suite"] = suite
    raw = apply_overrides(raw, [o.removeprefix("eval.") for o in overrides])
    is_path = "://" not in model and not model.startswith(REGISTRY_SCHEME)
    source = str(Path(model).resolve()) if is_path else model
    problems: list[SpecProblem] = []
    specs: list[Any] = []
    for section, schema, data in (("model", ModelSpec, {"source": source}), ("eval", EvalSpec, raw)):
        try:
            specs.append(schema.model_validate(data, context={"root": Path.cwd()}))
        except ValidationError as e:
            problems += [p.model_copy(update={"path": f"{section}.{p.path}"}) for p in problems_from(e, schema)]
    if problems:
        raise SpecError("gauntlet eval", problems)
    return specs[0], specs[1]


def check_timezone(name: str, option: str = "--timezone") -> str:
    """An IANA timezone name (for the nightly schedule); SpecError naming the option otherwise."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise SpecError(option, [SpecProblem(path=option, message=f"unknown timezone {name!r}",
                                             hint="use an IANA name such as Europe/Berlin")]) from None
    return name
