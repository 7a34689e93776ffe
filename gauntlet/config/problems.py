"""Config problems: each with its YAML path and a hint, from pydantic's errors (close matches for typos)."""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails


class SpecProblem(BaseModel):
    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return f"  {printable(self.path)}: {printable(self.message)}" + (
            f"\n      hint: {printable(self.hint)}" if self.hint else "")


def printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\x1c``): a key or value from a config prints on
    its problem's one line, and cannot move the terminal's cursor."""
    return text if text.isprintable() else "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class SpecError(Exception):
    """An invalid config; ``problems`` lists each one with its YAML path."""

    def __init__(self, source: str, problems: list[SpecProblem]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"] + [str(p) for p in problems]
        super().__init__("\n".join(lines))


def _members(ann: Any) -> list[Any]:
    """The types a union may take (None left out), or ``[ann]``."""
    if get_origin(ann) in (Union, types.UnionType):
        return [a for a in get_args(ann) if a is not type(None)]
    return [ann]


def yaml_path(schema: type[BaseModel], loc: tuple) -> tuple[list[str], type[BaseModel] | None]:
    """pydantic's ``loc`` as the YAML path it points at, with the model that path's last key belongs to (for
    'did you mean'). pydantic names the member of a union it tried (``eval.tasks.0.EvalTaskSpec.limit``,
    ``train.lora.target_modules.list[str]``): no such key is in the YAML, so the names are left out."""
    path: list[str] = []
    ann: Any = schema
    owner: type[BaseModel] | None = None
    for part in loc:
        members = _members(ann)
        if len(members) > 1 and isinstance(part, str):   # a member's name, not a key
            ann = next((m for m in members if (m.__name__ if isinstance(m, type) else str(m)) == part), None)
            continue
        ann = members[0]
        path.append(str(part))
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            owner = ann
            field = ann.model_fields.get(str(part))
            ann = field.annotation if field else None
        elif get_origin(ann) in (list, tuple, dict):
            ann = get_args(ann)[-1] if get_origin(ann) is dict else get_args(ann)[0]
        else:
            ann = None
    return path, owner


def did_you_mean(name: str, options: Iterable[str], listed: str = "valid keys here") -> str:
    """``did you mean 'x'? valid keys here: a, b`` for a ``name`` that is none of ``options``."""
    options = list(options)
    close = difflib.get_close_matches(name, options, n=1)
    return (f"did you mean {close[0]!r}? " if close else "") + f"{listed}: {', '.join(options)}"


# Hints for the checks our own validators make (pydantic's built-in errors get generic hints below).
FIELD_HINTS = {
    "model.source": "use demo://tiny-llama, hf://org/name@revision, or a folder saved with save_pretrained()",
    "data.train": "`dvc add` the file or list it in a dvc.yaml stage's outs, or fix the path",
    "data.validation": "`dvc add` the file or list it in a dvc.yaml stage's outs, or fix the path",
    "data.eval": "`dvc add` the file or list it in a dvc.yaml stage's outs, or fix the path",
    "eval.tasks": "add evals/<task>.yaml (an lm-eval task YAML) or use one of the listed tasks",
}


# Keys that moved: the error says where they live now.
MOVED_KEYS = {
    "ranking.random_baselines": "random baselines are part of the evaluation protocol now: declare "
                                "`random_baseline` in evals/suites.yaml or as metadata.random_baseline in the task "
                                "YAML (left out, multiple-choice tasks use the mean of 1/choices over their items)",
}


def _hint(err: ErrorDetails, loc: list[str], owner: type[BaseModel] | None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden" and ".".join(loc) in MOVED_KEYS:
        return MOVED_KEYS[".".join(loc)]
    if kind == "value_error" and ".".join(loc) in FIELD_HINTS:
        return FIELD_HINTS[".".join(loc)]
    if kind == "extra_forbidden":
        return did_you_mean(loc[-1], owner.model_fields if owner else [])
    if kind == "missing":
        return "add this key"
    if kind == "finite_number":
        return f"got {err.get('input')!r}; give a finite number (nan and inf mean nothing here)"
    if kind.endswith("_parsing") or kind.endswith("_type"):
        return f"got {err.get('input')!r}; expected {kind.split('_')[0]}"
    if kind in ("greater_than", "greater_than_equal", "less_than"):
        return f"got {err.get('input')!r}"
    if kind == "literal_error":
        return f"got {err.get('input')!r}"
    return ""


def problems_from(error: ValidationError, schema: type[BaseModel]) -> list[SpecProblem]:
    """Every problem of ``error`` with its YAML path; ``schema`` (the model validated) gives the close matches."""
    out = []
    for err in error.errors():
        loc, owner = yaml_path(schema, err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        msg, own_fix, fix = msg.partition(" Fix: ")   # a validator that knows the fix says it: it wins
        problem = SpecProblem(path=".".join(loc) or "(top level)", message=msg,
                              hint=fix if own_fix else _hint(err, loc, owner))
        if problem not in out:   # two members of a union can fail alike
            out.append(problem)
    return out

