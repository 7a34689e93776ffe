"""Property-based fuzz test of the config loader and ``--set`` (hypothesis): no YAML text and no override value
makes ``gauntlet validate`` print a traceback. It exits 0 (valid) or 2, every problem printed with its YAML path.

The command runs in-process (``gauntlet.cli.main``, output captured), so an example costs milliseconds. The
examples are drawn the same way on every run (``derandomize``), so the unit tier stays fast and cannot fail one
run in ten; ``GAUNTLET_FUZZ_EXAMPLES=5000`` explores further with fresh random examples each run.

Inputs: random text; YAML-like text (YAML's own scalars, tags and flow syntax, in lines of ``key: value``);
run and leaderboard configs (configs/demo.yaml, configs/leaderboard.yaml, or nothing) whose fields, found by
walking the config schema, get random values of random types or raw YAML tokens; ``--set`` overrides of known
or random keys with such values. Then two rules every config must follow: no number field takes a non-finite
value, and a tracking store is a server, a database or a place inside the project.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import re
import types
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st
from pydantic import BaseModel

from gauntlet.cli import main as gauntlet
from gauntlet.config.leaderboard import LeaderboardSpec
from gauntlet.config.run import RunSpec
from tests.helpers import REPO

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_EXPLORE = int(os.environ.get("GAUNTLET_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_EXPLORE or 120, deadline=None, derandomize=not _EXPLORE, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

DEMO_RAW = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
LEADERBOARD_RAW = yaml.safe_load((REPO / "configs" / "leaderboard.yaml").read_text())


# ---- the schema: every field path (list items as index 0, dict entries under a key), and the number fields ----

def _shapes(ann: Any) -> list[tuple[tuple, Any]]:
    """The leaf types a value of ``ann`` may take, each with the path segments that reach it inside lists/dicts."""
    origin = get_origin(ann)
    if origin in (Union, types.UnionType):
        return [shape for arg in get_args(ann) for shape in _shapes(arg)]
    if origin in (list, tuple):
        return [((0,) + segs, leaf) for arg in get_args(ann) if arg is not Ellipsis for segs, leaf in _shapes(arg)]
    if origin is dict:
        return [(("k",) + segs, leaf) for segs, leaf in _shapes(get_args(ann)[1])]
    if origin is Literal:
        return [((), type(v)) for v in get_args(ann)]
    return [((), ann)]


def schema_paths(model: type[BaseModel], prefix: tuple = ()) -> tuple[list[tuple], list[tuple]]:
    """(every settable path, the paths of number fields) under ``model``."""
    paths, numbers = [], []
    for name, field in model.model_fields.items():
        path = prefix + (name,)
        paths.append(path)
        for segs, leaf in _shapes(field.annotation):
            if segs:
                paths.append(path + segs)
            if isinstance(leaf, type) and issubclass(leaf, BaseModel):
                sub_paths, sub_numbers = schema_paths(leaf, path + segs)
                paths += sub_paths
                numbers += sub_numbers
            elif leaf in (int, float):
                numbers.append(path + segs)
    return sorted(set(paths), key=str), sorted(set(numbers), key=str)


RUN_PATHS, RUN_NUMBERS = schema_paths(RunSpec)
BOARD_PATHS, BOARD_NUMBERS = schema_paths(LeaderboardSpec)
# eval.tasks_dir is left alone: '' or '.' is the project root, whose every YAML file (.venv's too) the task
# lookup reads, half a minute per example (gauntlet/eval/suites.py, local_tasks)
FUZZED_RUN_PATHS = [p for p in RUN_PATHS if p[-1] != "tasks_dir"]
FUZZED_BOARD_PATHS = [p for p in BOARD_PATHS if p[-1] != "tasks_dir"]


def dotted(path: tuple) -> str:
    return ".".join(str(p) for p in path)


DELETE = object()


def set_path(raw: dict, path: tuple, value: Any) -> None:
    """Put ``value`` at ``path`` in ``raw`` (DELETE removes it), making lists and dicts on the way."""
    node: Any = raw
    for seg, nxt in pairwise(path):
        want = list if isinstance(nxt, int) else dict
        if isinstance(node, list):
            while len(node) <= seg:
                node.append({})
        child = node[seg] if isinstance(node, list) or seg in node else None
        if not isinstance(child, want):
            child = [{}] if want is list else {}
            node[seg] = child
        node = child
    last = path[-1]
    if isinstance(node, list):
        while len(node) <= last:
            node.append({})
    if value is DELETE:
        if isinstance(node, dict):
            node.pop(last, None)
    else:
        node[last] = value


# ---- values ----

# YAML's own syntax: implicit types (YAML 1.1 ints, floats, timestamps, bools), tags, flow and block indicators.
YAML_CHARS = "abcxyz019 .-+_:,#&*!|>'\"%@`?[]{}~\\/\t\n"
yaml_tokens = st.one_of(
    st.sampled_from([".nan", ".NaN", ".inf", "-.inf", "+.inf", "nan", "inf", "-inf", "1e999", "0x", "0o9", "0b2",
                     "1_000", "190:20:30", "~", "null", "yes", "off", "[", "]", "{", "}", "&a", "*a", "? a", "|",
                     ">", "%YAML 1.1", "---", "...", "'", '"', "@", "`", "<<: *a", "!!python/name:os.system"]),
    st.builds("{} {}".format, st.sampled_from(["!!int", "!!float", "!!bool", "!!null", "!!str", "!!timestamp",
                                               "!!binary", "!!set", "!!omap", "!!map", "!!seq", "!local"]),
              st.text(YAML_CHARS, max_size=8)),
    st.from_regex(r"\A-?[0-9]{1,4}(-[0-9]{1,2}){2}([Tt ][0-9]{1,2}:[0-9]{1,2}(:[0-9]{1,2})?)?\Z"),
    st.text(YAML_CHARS, max_size=12),
)

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20), st.dates(),
                    st.sampled_from(["../../../etc/passwd", "/etc/passwd", "x" * 300, "models:/x@champion",
                                     "hf://org/name@main", "demo://tiny-llama", "file:///etc", "http://h:1"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)


def document(base: dict, paths: list[tuple]) -> st.SearchStrategy[str]:
    """YAML text of ``base`` with a few fields (or unknown keys next to them) set to random values, raw YAML
    tokens, or removed."""
    unknown = st.builds(lambda p, k: p[:-1] + (k,), st.sampled_from(paths), st.text(max_size=10))
    change = st.tuples(st.one_of(st.sampled_from(paths), unknown),
                       st.one_of(values, yaml_tokens.map(lambda t: ("raw", t)), st.just(DELETE)))

    @st.composite
    def build(draw) -> str:
        raw = copy.deepcopy(draw(st.sampled_from([base, {}])))
        raws: list[str] = []
        for path, value in draw(st.lists(change, min_size=1, max_size=4)):
            if isinstance(value, tuple):   # a raw YAML token: a placeholder now, the token in the text
                raws.append(value[1])
                value = f"RAWTOKEN{len(raws) - 1}X"
            # a copy: a later change may write inside this value, and hypothesis keeps what it drew
            set_path(raw, path, value if value is DELETE else copy.deepcopy(value))
        text = yaml.safe_dump(raw, allow_unicode=True)
        for i, token in enumerate(raws):
            text = text.replace(f"RAWTOKEN{i}X", token)
        return text

    return build()


yaml_lines = st.lists(st.builds("{}{}: {}".format, st.sampled_from(["", "  ", "    ", "- ", "\t"]),
                                st.one_of(st.sampled_from([dotted(p[:1]) for p in RUN_PATHS]), yaml_tokens),
                                yaml_tokens), max_size=8).map("\n".join)


def overrides(paths: list[tuple]) -> st.SearchStrategy[str]:
    """``--set KEY=VALUE``: a field's dotted path or random text, and a value written as YAML or random text."""
    key = st.one_of(st.sampled_from([dotted(p) for p in paths]), st.text(max_size=12))
    value = st.one_of(yaml_tokens, st.text(max_size=12),
                      values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).removesuffix("\n...\n")
                                 .strip()))
    return st.builds("{}={}".format, key, value)


# ---- running `gauntlet validate` and reading what it printed ----

@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def validate(folder: Path, text: str | bytes, sets: list[str] = ()) -> tuple[int, str, str]:
    path = folder / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = gauntlet(["validate", str(path), *[f"--set={s}" for s in sets]])   # an exception fails the test
    return code, out.getvalue(), err.getvalue()


PROBLEM = re.compile(r"  (?P<path>.+?): (?P<message>.+)")


def printed_problems(code: int, out: str, err: str) -> list[str]:
    """The YAML paths of the problems printed; checks the command exited 0 or 2 and said so in its format."""
    assert "Traceback" not in out + err, out + err
    assert code in (0, 2), (code, out, err)
    if code == 0:
        assert "valid" in out and not err, (out, err)
        return []
    head, *lines = err.rstrip("\n").split("\n")
    count = re.fullmatch(r".+: (\d+) problem\(s\)", head)
    assert count, err
    problems = [line for line in lines if not line.startswith("      hint: ")]
    assert len(problems) == int(count[1]) > 0, err
    matches = [PROBLEM.fullmatch(line) for line in problems]
    assert all(matches), err
    return [m["path"] for m in matches]


def changed(base: dict, *changes: tuple[tuple, Any]) -> str:
    """YAML text of ``base`` with ``changes`` (path, value) applied."""
    raw = copy.deepcopy(base)
    for path, value in changes:
        set_path(raw, path, value)
    return yaml.safe_dump(raw)


# ---- the properties; each @example is an input that crashed the command or broke its output before its fix ----

@FUZZ
@given(text=st.one_of(st.text(), yaml_lines))
@example(text="name: 2020-99-99")        # YAML 1.1 reads a date; datetime.date raised ValueError through the loader
@example(text="- !!float a: ~9}")        # float('a'): ValueError
@example(text="a: !!bool x")             # KeyError from the bool table
@example(text="a: !!timestamp")          # AttributeError: the timestamp regex did not match
@example(text="a: !!float")              # IndexError on the empty value
@example(text="\x08")                    # YAML's reader error printed over two lines, without a place
@example(text='"\\x1c": 1')              # a key with a control character printed raw on the problem's line
@example(text="[" * 1000)                # RecursionError in YAML's composer
def test_any_text(workdir: Path, text: str) -> None:
    printed_problems(*validate(workdir, text))


@FUZZ
@given(text=document(DEMO_RAW, FUZZED_RUN_PATHS), sets=st.lists(overrides(FUZZED_RUN_PATHS), max_size=2))
@example(text=changed(DEMO_RAW, (("quantize", "variants", 0, "method"), ["gptq"])), sets=[])   # TypeError: unhashable
@example(text=changed(DEMO_RAW, (("data", "train"), "x" * 300)), sets=[])     # OSError: file name too long
@example(text=changed(DEMO_RAW, (("model", "source"), "x" * 300)), sets=[])
@example(text=changed(DEMO_RAW, (("eval", "tasks"), [{"limit": 0}])), sets=[])   # the path named no union member
def test_run_configs(workdir: Path, text: str, sets: list[str]) -> None:
    printed_problems(*validate(workdir, text, sets))


@FUZZ
@given(text=document(LEADERBOARD_RAW, FUZZED_BOARD_PATHS), sets=st.lists(overrides(FUZZED_BOARD_PATHS), max_size=2))
@example(text=changed(LEADERBOARD_RAW, (("eval", "tasks"), [{"name": "demo_facts"}])), sets=[])  # TypeError: str + spec
def test_leaderboard_configs(workdir: Path, text: str, sets: list[str]) -> None:
    printed_problems(*validate(workdir, text, sets))


@FUZZ
@given(sets=st.lists(overrides(FUZZED_RUN_PATHS), min_size=1, max_size=4))
@example(sets=["train.max_steps=!!int y"])      # ValueError through apply_overrides
@example(sets=["data.checks=!!timestamp"])      # AttributeError
@example(sets=["gate.metric=!!bool x"])         # KeyError
@example(sets=["train.max_steps=[1,"])          # yaml.ParserError: not caught for --set values
def test_overrides(workdir: Path, sets: list[str]) -> None:
    printed_problems(*validate(workdir, yaml.safe_dump(DEMO_RAW), sets))


# ---- the rules ----

NON_FINITE = [".nan", ".inf", "-.inf", ".NaN", "+.Inf"]   # as YAML writes them; --set values take nan, inf too


@pytest.mark.parametrize("base, numbers", [(DEMO_RAW, RUN_NUMBERS), (LEADERBOARD_RAW, BOARD_NUMBERS)],
                         ids=["run", "leaderboard"])
@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_numbers_refused_in_yaml(workdir: Path, base: dict, numbers: list[tuple], value: str) -> None:
    """Every number field of every section (found by walking the schema) refuses nan and inf, naming itself."""
    text = changed(base, *[(path, "NONFINITE") for path in numbers]).replace("NONFINITE", value)
    printed = printed_problems(*validate(workdir, text))
    assert {dotted(path) for path in numbers} <= set(printed), sorted({dotted(p) for p in numbers} - set(printed))


@pytest.mark.parametrize("base, numbers", [(DEMO_RAW, RUN_NUMBERS), (LEADERBOARD_RAW, BOARD_NUMBERS)],
                         ids=["run", "leaderboard"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".inf"])
def test_non_finite_numbers_refused_in_overrides(workdir: Path, base: dict, numbers: list[tuple], value: str) -> None:
    """``--set x=nan`` too (YAML reads 'nan' as a string, which a float field used to parse as nan). Fields inside
    lists cannot be set one by one with --set."""
    settable = [p for p in numbers if not any(isinstance(seg, int) for seg in p)]
    printed = printed_problems(*validate(workdir, yaml.safe_dump(base), [f"{dotted(p)}={value}" for p in settable]))
    assert {dotted(path) for path in settable} <= set(printed), sorted({dotted(p) for p in settable} - set(printed))


STORES_ACCEPTED = ["http://127.0.0.1:5000", "https://mlflow.example.com/", "postgresql://mlflow@db.example/mlflow",
                   "postgresql+psycopg2://db.example:5432/mlflow", "mysql+pymysql://db.example/mlflow",
                   "postgresql:///mlflow", "sqlite:///.gauntlet/mlflow.db", f"sqlite:///{REPO}/.gauntlet/x.db",
                   "mlruns", ".gauntlet/mlruns", f"{REPO}/mlruns", f"file://{REPO}/mlruns"]
STORES_REFUSED = ["/tmp/mlruns", "../mlruns", "mlruns/../../x", "file:///etc/mlflow", "file://other-host/mlruns",
                  "sqlite:////tmp/x.db", "sqlite:///../x.db", "sqlite:///.gauntlet/../../x.db", "sqlite://",
                  "sqlite:///:memory:", "ftp://host/mlruns", "s3://bucket/mlruns", "http://",
                  "x" * 300]


@pytest.mark.parametrize("uri", STORES_ACCEPTED)
def test_tracking_store_accepted(workdir: Path, uri: str) -> None:
    assert printed_problems(*validate(workdir, changed(DEMO_RAW, (("tracking", "tracking_uri"), uri)))) == []


@pytest.mark.parametrize("base", [DEMO_RAW, LEADERBOARD_RAW], ids=["run", "leaderboard"])
@pytest.mark.parametrize("uri", STORES_REFUSED)
def test_tracking_store_refused(workdir: Path, base: dict, uri: str) -> None:
    """A store outside the project (or no store at all) is refused naming the field and the fix."""
    code, out, err = validate(workdir, changed(base, (("tracking", "tracking_uri"), uri)))
    assert printed_problems(code, out, err) == ["tracking.tracking_uri"], err
    assert "hint: use an MLflow server (http://host:5000)" in err
