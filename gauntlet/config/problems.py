"""Config problems: each with its YAML path and a hint, from pydantic's errors (close matches for typos)."""

from __future__ import annotations

import difflib
from typing import Any, get_args

from pydantic import BaseModel, ValidationError


class SpecProblem(BaseModel):
    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return f"  {self.path}: {self.message}" + (f"\n      hint: {self.hint}" if self.hint else "")


class SpecError(Exception):
    """An invalid config; ``problems`` lists each one with its YAML path."""

    def __init__(self, source: str, problems: list[SpecProblem]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"] + [str(p) for p in problems]
        super().__init__("\n".join(lines))


def _fields_of(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc`` (for 'did you mean')."""
    current: Any = model
    for part in loc:
        if part.isdigit():
            continue  # an index into a list of sections (leaderboard candidates)
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        inner = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]  # list[X], X | None
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (inner[0] if inner else None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


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


def _hint(err: dict, schema: type[BaseModel]) -> str:
    loc = tuple(str(x) for x in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden" and ".".join(loc) in MOVED_KEYS:
        return MOVED_KEYS[".".join(loc)]
    if kind == "value_error" and ".".join(loc) in FIELD_HINTS:
        return FIELD_HINTS[".".join(loc)]
    if kind == "extra_forbidden":
        options = _fields_of(schema, loc[:-1])
        close = difflib.get_close_matches(loc[-1], options, n=1)
        return (f"did you mean {close[0]!r}? " if close else "") + f"valid keys here: {', '.join(options)}"
    if kind == "missing":
        return "add this key"
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
        path = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        msg, own_fix, fix = msg.partition(" Fix: ")   # a validator that knows the fix says it: it wins
        out.append(SpecProblem(path=path, message=msg, hint=fix if own_fix else _hint(err, schema)))
    return out

