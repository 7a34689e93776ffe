"""Reading configs: YAML in, ``--set`` overrides applied, validated once; SpecError lists every problem."""

from __future__ import annotations

import os
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


class UnreadableValue(yaml.constructor.ConstructorError):
    """A scalar YAML's safe loader cannot build (its constructor raised a plain exception)."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, whose value errors become YAML errors at the value's line and column.

    Its constructors raise plain exceptions on scalars they cannot build (``2020-99-99`` is a date in YAML 1.1,
    ``!!float x``, ``!!bool x``, ``!!timestamp`` with nothing after it): without this a config crashes the loader."""

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as e:
            value = node.value if isinstance(node, yaml.ScalarNode) else node.id
            raise UnreadableValue(
                None, None, f"{node.tag.removeprefix('tag:yaml.org,2002:')} value {value!r} cannot be read "
                            f"({type(e).__name__}: {e})", node.start_mark) from None


def parse_yaml(text: str, source: str, where: str = "") -> Any:
    """``text`` as YAML; SpecError naming ``where`` (or the line and column) and the fix when it is not YAML."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(e, yaml.reader.ReaderError):   # a character YAML refuses: its place is a position
            line, problem = f"character {e.position + 1}", f"{e.reason}: #x{e.character:04x}"
        else:
            problem = getattr(e, "problem", None) or str(e)
        hint = ("quote the value to give a string, or write it as its type asks" if isinstance(e, UnreadableValue)
                else "check indentation and quoting near that line")
    except RecursionError:
        line, problem, hint = "", "nested too deeply", "flatten the structure"
    if where:
        raise SpecError(source, [SpecProblem(
            path=where, message=f"malformed YAML value: {problem}" + (f" at {line}" if line else ""),
            hint="quote the value to give a string (--set 'key=\"text\"'), or fix its YAML")])
    raise SpecError(source, [SpecProblem(path=line or "(file)", message=f"malformed YAML: {problem}", hint=hint)])


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
        node[parts[-1]] = parse_yaml(value, "--set", where=key)
    return raw


def read_config(path: Path) -> dict:
    """A config file's sections, as YAML read them; SpecError when the file is missing, not UTF-8 or not a
    YAML mapping."""
    source = str(path)
    if not os.path.isfile(path):   # os.path: a name too long for the OS is not found, not an OSError
        raise SpecError(source, [SpecProblem(path="(file)", message="config file not found", hint="check the path")])
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(source, [SpecProblem(path="(file)", message=f"not UTF-8 text: {e}", hint="save as UTF-8")]) from e
    except OSError as e:
        raise SpecError(source, [SpecProblem(path="(file)", message=f"cannot be read: {e.strerror}",
                                             hint="check the file's permissions")]) from None
    raw = parse_yaml(text, source)
    if not isinstance(raw, dict):
        raise SpecError(source, [SpecProblem(path="(top level)", message="config must be a mapping of sections")])
    return raw


def load_spec(path: str | Path, overrides: list[str] | None = None, root: Path | None = None,
              schema: type[BaseModel] = RunSpec) -> Any:
    """Read, override and validate a run config (or another ``schema``). Raises SpecError listing every problem."""
    path = Path(path)
    source = str(path)
    raw = apply_overrides(read_config(path), overrides or [])
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
        raw = read_config(Path(path))
    except SpecError:
        return "run"
    return "leaderboard" if "candidates" in raw and "model" not in raw else "run"


def load_eval_request(model: str, suite: str | None, tasks: list[str], fixtures: bool, overrides: list[str],
                      opponent: str | None = None) -> tuple[ModelSpec, EvalSpec, ModelSpec | None]:
    """``gauntlet eval MODEL --suite S --task T --set k=v [--opponent SOURCE]`` as validated sections; SpecError
    lists every problem. Local folders are taken from the working directory; eval settings are given without the
    ``eval.`` prefix. A judge (``judge=…``) needs the opponent its win rate is measured against."""
    raw: dict = {"tasks": list(tasks), "fixtures": bool(fixtures)}
    if suite:
        raw["suite"] = suite
    raw = apply_overrides(raw, [o.removeprefix("eval.") for o in overrides])

    def source_of(given: str) -> str:
        return str(Path(given).resolve()) if "://" not in given and not given.startswith(REGISTRY_SCHEME) else given

    sections: list[tuple[str, Any, dict]] = [("model", ModelSpec, {"source": source_of(model)}),
                                             ("eval", EvalSpec, raw)]
    if opponent is not None:
        sections.append(("--opponent", ModelSpec, {"source": source_of(opponent)}))
    problems: list[SpecProblem] = []
    specs: list[Any] = []
    for section, schema, data in sections:
        try:
            specs.append(schema.model_validate(data, context={"root": Path.cwd()}))
        except ValidationError as e:
            problems += [p.model_copy(update={"path": f"{section}.{p.path}"}) for p in problems_from(e, schema)]
    if not problems and specs[1].judge is not None and opponent is None:
        problems.append(SpecProblem(path="--opponent", message="eval.judge is set, so the candidate's answers are "
                                                               "judged against another model's, and none is named",
                                    hint="add --opponent SOURCE (a folder, hf://org/name@revision, "
                                         "models:/NAME@alias), or drop the judge"))
    if problems:
        raise SpecError("gauntlet eval", problems)
    return specs[0], specs[1], specs[2] if opponent is not None else None


def check_timezone(name: str, option: str = "--timezone") -> str:
    """An IANA timezone name (for the nightly schedule); SpecError naming the option otherwise."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise SpecError(option, [SpecProblem(path=option, message=f"unknown timezone {name!r}",
                                             hint="use an IANA name such as Europe/Berlin")]) from None
    return name
