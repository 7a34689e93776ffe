"""Checking JSON Lines data files: UTF-8, one object per line, the fields its layout needs, a row-size limit.

Alpaca rows need ``instruction``, ``input`` and ``output`` strings (or the configured
``data.required_fields``); chat rows (``messages`` or ShareGPT ``conversations``) are checked with the
training stage's own turn rules (:func:`gauntlet.data.sft.row_problem`); preference rows (``{prompt, chosen,
rejected}``, KTO's ``{prompt, completion, label}``) with :func:`gauntlet.data.preference.row_problem` (``chosen ==
rejected`` refused); evaluation rows need an ``instruction``. Every problem names its file and line and says how to fix it.
"""

from __future__ import annotations

import json
from pathlib import Path

from gauntlet.data import preference
from gauntlet.data.sft import row_problem

EVAL_REQUIRED_FIELDS = ("instruction",)
ALPACA_FIELDS = ("instruction", "input", "output")
MAX_REPORTED_PROBLEMS = 20


class DataError(ValueError):
    """The data cannot be pulled, reproduced or validated; the message says what to do."""


def validate_jsonl(path: Path, required_fields: tuple[str, ...] | None) -> tuple[int, float]:
    """Check one JSON Lines file; return (rows, duplicate rate). Raises DataError listing problems."""
    problems: list[str] = []
    rows, dup = _check_file(path, required_fields, problems)
    if problems:
        raise DataError(_problems_message(problems))
    return rows, dup


def validate_files(files: dict[str, Path], required_fields: tuple[str, ...] | None,
                   max_row_bytes: int) -> tuple[dict[str, int], float]:
    """Check a run's files by role (train, validation, eval); return rows per role and the training
    data's duplicate rate. Raises DataError listing every problem."""
    problems: list[str] = []
    rows: dict[str, int] = {}
    duplicate_rate = 0.0
    for role, path in files.items():
        required = EVAL_REQUIRED_FIELDS if role == "eval" else required_fields
        n, dup = _check_file(path, required, problems, max_row_bytes)
        rows[role] = n
        if role == "train":
            duplicate_rate = dup
    if problems:
        raise DataError(_problems_message(problems))
    return rows, duplicate_rate


def _problems_message(problems: list[str]) -> str:
    shown = problems[:MAX_REPORTED_PROBLEMS]
    more = len(problems) - len(shown)
    lines = [f"invalid data: {len(problems)} problem(s)"] + [f"  {p}" for p in shown]
    if more > 0:
        lines.append(f"  … and {more} more")
    lines.append("Fix the data at its source, then `dvc repro` (or `dvc add`) and `dvc push` the new version.")
    return "\n".join(lines)


def _check_file(path: Path, required: tuple[str, ...] | None, problems: list[str],
                max_row_bytes: int = 1 << 20) -> tuple[int, float]:
    """Append problems ('file:line: what — fix') to ``problems``; return (rows, duplicate rate).

    ``required``: string fields every row must have; None: by the file's layout, read off its first row
    (alpaca: ``ALPACA_FIELDS``; chat: the training stage's own turn rules, ``sft_data.row_problem``)."""
    if problem := _file_problem(path):
        problems.append(problem)
        return 0, 0.0
    layout = None
    rows = duplicates = 0
    seen: set[str] = set()
    with open(path, "rb") as f:
        # readline(limit) never holds more than one over-long row's first bytes in memory
        for lineno, raw in enumerate(iter(lambda: f.readline(max_row_bytes + 1), b""), start=1):
            if len(problems) > MAX_REPORTED_PROBLEMS:
                break
            if len(raw) > max_row_bytes:
                problems.append(f"{path}:{lineno}: row longer than data.max_row_bytes={max_row_bytes} bytes — "
                                "split or drop it, or raise data.max_row_bytes")
                while raw and not raw.endswith(b"\n"):  # skip the rest of that row
                    raw = f.readline(max_row_bytes + 1)
                continue
            row = _parse_row(f"{path}:{lineno}", raw, lineno == 1, required, problems)
            if row is None:
                continue
            layout = layout or ("fields" if required is not None else preference.detect_layout(row))
            problems += _row_problems(f"{path}:{lineno}", row, layout, required)
            rows += 1
            key = json.dumps(row, sort_keys=True, ensure_ascii=False)
            duplicates += key in seen
            seen.add(key)
    if rows == 0 and not any(p.startswith(f"{path}:") for p in problems):
        problems.append(f"{path}: file has no rows (only blank lines) — check the stage that produces it")
    return rows, (duplicates / rows if rows else 0.0)


def _file_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path}: file not found — run `dvc pull`/`dvc repro` for it"
    if path.stat().st_size == 0:
        return f"{path}: file is empty — the stage that produces it wrote nothing; check it and `dvc repro`"
    return None


def _parse_row(where: str, raw: bytes, first: bool, required: tuple[str, ...] | None,
               problems: list[str]) -> dict | None:
    """One line as a JSON object; None for a blank line or one with a problem (appended)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{where}: not UTF-8 ({exc.reason} at byte {exc.start}) — save the file as UTF-8")
        return None
    if first:
        line = line.removeprefix("\ufeff")
    if not line.strip():
        return None  # blank lines (a trailing newline) carry no row
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        problems.append(f"{where}: invalid JSON ({exc.msg}, column {exc.colno}) — each line must be one JSON "
                        "object (JSON Lines)")
        return None
    if not isinstance(row, dict):
        fields = ", ".join(required) if required is not None else f"{', '.join(ALPACA_FIELDS)} (or a chat " \
                                                                  "messages list)"
        problems.append(f"{where}: a JSON {type(row).__name__}, not an object — each line must be one JSON "
                        f"object with the fields {fields}")
        return None
    return row


def _row_problems(where: str, row: dict, layout: str, required: tuple[str, ...] | None) -> list[str]:
    """A row's problems for its layout: chat turns by the training stage's rules, else the string fields."""
    problems = []
    if layout in ("pairs", "kto"):
        if problem := preference.row_problem(row, layout):  # type: ignore[arg-type]
            problems.append(f"{where}: {problem} — {layout} rows are {preference.layout_fields(layout)}")
        return problems
    if layout == "chat" and (problem := row_problem(row, "chat")):
        problems.append(f"{where}: {problem} — chat rows need a messages (or ShareGPT conversations) list of "
                        "role/content turns with an assistant answer")
    fields = () if layout == "chat" else required if required is not None else ALPACA_FIELDS
    absent = [k for k in fields if k not in row]
    wrong = [k for k in fields if k in row and not isinstance(row[k], str)]
    if absent:
        problems.append(f"{where}: missing required field(s) {', '.join(absent)} — add them to every row, or "
                        "change data.required_fields")
    if wrong:
        problems.append(f"{where}: field(s) {', '.join(wrong)} must be strings — write them as JSON strings")
    return problems
