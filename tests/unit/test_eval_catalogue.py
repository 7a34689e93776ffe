"""The evaluation catalogue: the fixtures are the engine's own task definitions (checked against lm-eval's
YAMLs) with correct answers, suites name real tasks, per-task settings win, config errors name the YAML
path, and the protocol records every choice. The engine runs in tests/integration/test_eval_suites.py."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from gauntlet.config.eval import EvalSpec
from gauntlet.config.load import load_spec
from gauntlet.config.problems import SpecError
from gauntlet.eval.protocol import (
    protocol_differences,
    protocol_of,
    protocols_match,
)
from gauntlet.eval.suites import load_catalog, plan_tasks
from tests.helpers import REPO

EVALS = REPO / "evals"

FIXTURE_DATA = EVALS / "fixtures" / "data"


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_fixture_yamls_are_the_engines_own_and_up_to_date() -> None:
    """build.py derives each fixture YAML from the installed lm-eval's YAML; the committed files match."""
    spec = importlib.util.spec_from_file_location("fixtures_build", EVALS / "fixtures" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.main(["--check"]) == 0, "evals/fixtures is stale: run python evals/fixtures/build.py"

    from lm_eval.tasks._yaml_loader import load_yaml

    engine_root = build.engine_dir()
    fixture_yamls = sorted((EVALS / "fixtures").rglob("fixture_*.yaml"))
    assert len(fixture_yamls) == 11
    for path in fixture_yamls:
        ours = load_yaml(path, resolve_func=False)
        engine = load_yaml(engine_root / ours["metadata"]["mirrors"], resolve_func=False)
        for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "output_type", "metric_list", "filter_list",
                    "generation_kwargs", "fewshot_config", "description", "target_delimiter", "test_split",
                    "fewshot_split", "training_split", "validation_split", "num_fewshot"):
            assert ours.get(key) == engine.get(key), (path.name, key)
        assert ours["dataset_path"] == "json" and engine["dataset_path"] != "json"
        for files in ours["dataset_kwargs"]["data_files"].values():
            assert (REPO / files).is_file(), files
    # groups aggregate like the engine's groups
    for path in sorted((EVALS / "fixtures").rglob("_fixture_*.yaml")):
        ours = yaml.safe_load(path.read_text())
        engine = yaml.safe_load((engine_root / ours["metadata"]["mirrors"]).read_text())
        assert ours["aggregate_metric_list"] == engine["aggregate_metric_list"]


def test_fixture_rows_have_the_real_datasets_fields_and_correct_answers() -> None:
    mmlu = _jsonl(FIXTURE_DATA / "mmlu" / "elementary_mathematics" / "test.jsonl")
    assert len(mmlu) >= 10
    for row in mmlu:
        assert set(row) == {"question", "subject", "choices", "answer"} and len(row["choices"]) == 4
        a, op, b = re.match(r"What is the value of (\d+) (.) (\d+)\?", row["question"]).groups()
        expected = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
        assert row["choices"][row["answer"]] == str(expected)
    for row in _jsonl(FIXTURE_DATA / "arc_challenge" / "test.jsonl"):
        assert set(row) == {"id", "question", "choices", "answerKey"}
        assert row["answerKey"] in row["choices"]["label"]
        assert len(row["choices"]["text"]) == len(row["choices"]["label"])
    for row in _jsonl(FIXTURE_DATA / "hellaswag" / "validation.jsonl"):
        assert {"ctx_a", "ctx_b", "ctx", "activity_label", "endings", "label"} <= set(row)
        assert isinstance(row["label"], str) and 0 <= int(row["label"]) < len(row["endings"]) == 4
    gsm8k = _jsonl(FIXTURE_DATA / "gsm8k" / "test.jsonl")
    assert len(gsm8k) >= 20
    for row in gsm8k:
        final = int(row["answer"].rsplit("#### ", 1)[1])
        steps = re.findall(r"<<([^=]+)=(-?\d+)>>", row["answer"])
        assert steps and all(eval(expr) == int(value) for expr, value in steps)  # noqa: S307 - our fixture
        assert int(steps[-1][1]) == final
    for row in _jsonl(FIXTURE_DATA / "ceval" / "computer_network" / "val.jsonl"):
        assert set(row) == {"id", "question", "A", "B", "C", "D", "answer", "explanation"}
        assert row["answer"] in "ABCD" and re.search(r"[\u4e00-\u9fff]", row["question"])
    for row in _jsonl(FIXTURE_DATA / "cmmlu" / "high_school_geography" / "test.jsonl"):
        assert set(row) == {"Question", "A", "B", "C", "D", "Answer"} and row["Answer"] in "ABCD"
    for subtask in ("boolean_expressions", "multistep_arithmetic_two"):
        for row in _jsonl(FIXTURE_DATA / "bbh" / subtask / "test.jsonl"):
            assert set(row) == {"input", "target"}
            assert str(eval(row["input"].removesuffix(" is").removesuffix(" ="))) == row["target"]  # noqa: S307


def test_suites_name_the_engine_tasks_and_their_fixtures() -> None:
    catalog = load_catalog(EVALS)
    assert catalog.suites["en-core"].tasks == ["mmlu", "arc_challenge", "hellaswag", "gsm8k"]
    assert catalog.suites["zh-core"].tasks == ["ceval-valid", "cmmlu"]
    assert catalog.suites["reasoning"].tasks == ["bbh", "gsm8k"]

    real = {p.name: p for p in plan_tasks(EvalSpec(suite="en-core", tasks=["ceval-valid", "cmmlu", "bbh"]))}
    assert {n: p.engine_task for n, p in real.items()} == {
        "mmlu": "mmlu", "arc_challenge": "arc_challenge", "hellaswag": "hellaswag", "gsm8k": "gsm8k",
        "ceval-valid": "ceval-valid", "cmmlu": "cmmlu", "bbh": "bbh"}
    assert all(p.source == "engine" and p.content_sha is None for p in real.values())
    # the leaderboard's few-shot counts by default
    assert {n: p.num_fewshot for n, p in real.items()} == {
        "mmlu": 5, "arc_challenge": 25, "hellaswag": 10, "gsm8k": 5, "ceval-valid": 5, "cmmlu": 5, "bbh": 3}

    fixtures = {p.name: p for p in plan_tasks(EvalSpec(suite="en-core", fixtures=True))}
    assert {n: p.engine_task for n, p in fixtures.items()} == {
        "mmlu": "fixture_mmlu", "arc_challenge": "fixture_arc_challenge", "hellaswag": "fixture_hellaswag",
        "gsm8k": "fixture_gsm8k"}
    assert all(p.source == "fixture" and p.content_sha for p in fixtures.values())
    # a fixture's few-shot pool is small: the count is capped by it (ARC has 5 training rows, not 25)
    assert fixtures["arc_challenge"].num_fewshot == 5 and fixtures["mmlu"].num_fewshot == 5


def test_per_task_settings_override_the_suite_and_the_section() -> None:
    spec = EvalSpec(suite="reasoning", num_fewshot=2, limit=7, max_gen_tokens=64,
                    tasks=[{"name": "gsm8k", "num_fewshot": 0, "limit": 3}, "demo_facts_gen"])
    plans = {p.name: p for p in plan_tasks(spec)}
    assert list(plans) == ["bbh", "gsm8k", "demo_facts_gen"]  # suite order, then added tasks
    assert (plans["bbh"].num_fewshot, plans["bbh"].limit, plans["bbh"].max_gen_tokens) == (2, 7, 64)
    assert (plans["gsm8k"].num_fewshot, plans["gsm8k"].limit) == (0, 3)
    # the user's own generate-until task: metric and baseline from its YAML
    user = plans["demo_facts_gen"]
    assert user.source == "local" and user.metric == "exact_match,first-word" and user.uses_run_eval_data
    # without section-wide values, each task's catalogue defaults apply
    plans = {p.name: p for p in plan_tasks(EvalSpec(suite="reasoning"))}
    assert plans["gsm8k"].max_gen_tokens == 256 and plans["bbh"].max_gen_tokens == 512
    # a task the catalogue does not know: nothing set, so its own YAML's settings hold in lm-eval
    assert plan_tasks(EvalSpec(tasks=["demo_facts"]))[0].max_gen_tokens is None
    assert plan_tasks(EvalSpec(tasks=["demo_facts"]))[0].num_fewshot is None


def test_config_errors_name_the_yaml_path(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    raw["gate"].pop("max_perplexity_increase")   # the eval sections below measure no perplexity
    cases = {
        "eval.suite": {"suite": "en-cor", "tasks": []},
        "eval.tasks": {"tasks": ["mmlu", "no_such_task"]},
    }
    for where, section in cases.items():
        raw["eval"] = section
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(SpecError) as err:
            load_spec(path)
        assert [p.path for p in err.value.problems] == [where], err.value
    raw["eval"] = {"suite": "en-cor"}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="unknown suite 'en-cor'.*en-core"):
        load_spec(path)
    raw["eval"] = {"tasks": []}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="name a suite"):
        load_spec(path)
    # the demo's own form keeps working
    raw["eval"] = {"tasks": ["demo_facts"]}
    path.write_text(yaml.safe_dump(raw))
    assert load_spec(path).eval.tasks == ["demo_facts"]


def test_protocol_records_the_choices_and_says_when_two_differ() -> None:
    base = EvalSpec(suite="en-core", fixtures=True, limit=4)
    protocol = protocol_of(base)
    for key, value in {"decoding": "each task's own", "temperature": None, "repeats": 1, "fewshot_seed": 1234, "apply_chat_template": False,
                       "batch_size": 16, "backend": "hf", "engine": "lm-eval", "fixtures": True}.items():
        assert protocol[key] == value, key
    assert protocol["engine_version"] == "0.4.13" or protocol["engine_version"]
    assert set(protocol["task_settings"]) == {"mmlu", "arc_challenge", "hellaswag", "gsm8k"}
    assert protocols_match(protocol, protocol_of(EvalSpec(suite="en-core", fixtures=True, limit=4)))

    other = protocol_of(EvalSpec(suite="en-core", fixtures=True, limit=4, apply_chat_template=True, fewshot_seed=7))
    diff = protocol_differences(protocol, other)
    assert "apply_chat_template: False != True" in diff and "fewshot_seed: 1234 != 7" in diff
    assert not protocols_match(protocol, other)
    shots = protocol_differences(protocol, protocol_of(EvalSpec(suite="en-core", fixtures=True, limit=4,
                                                                tasks=[{"name": "gsm8k", "num_fewshot": 0}])))
    assert shots == ["task_settings.gsm8k.num_fewshot: 5 != 0"]
    real = protocol_differences(protocol, protocol_of(EvalSpec(suite="en-core", limit=4)))
    assert "fixtures: True != False" in real
