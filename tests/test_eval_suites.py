"""Suites, fixtures and the protocol: every suite's fixture path through the real lm-eval engine on a
tiny real model, the fixtures checked against the engine's own task definitions, and our wrapper's
scores checked against the engine's own CLI on the same model and data. Nothing is mocked."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gauntlet.demo import data as demo_data
from gauntlet.eval.engine import EvalError
from gauntlet.eval.protocol import protocol_differences, protocol_of, protocols_match, require_same_protocol
from gauntlet.eval.report import evaluate_model, load_report
from gauntlet.refs import ModelRef
from gauntlet.config.eval import EvalSpec, SpeedProbeSpec
from gauntlet.config.load import load_spec
from gauntlet.config.problems import SpecError
from tests.helpers import REPO
from gauntlet.eval.suites import load_catalog, normalized_score, plan_tasks

EVALS = REPO / "evals"
FIXTURE_DATA = EVALS / "fixtures" / "data"
ALL_SUITES = ("en-core", "zh-core", "reasoning", "demo")
LIMIT = 4


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------
# the fixtures: the engine's task definitions, over data in the real datasets' formats
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# suites and their configuration
# ---------------------------------------------------------------------------------------------


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
    assert plan_tasks(EvalSpec(tasks=["demo_facts"]))[0].max_gen_tokens == 32


def test_config_errors_name_the_yaml_path(tmp_path: Path) -> None:
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
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
    for key, value in {"decoding": "greedy", "temperature": 0.0, "fewshot_seed": 1234, "apply_chat_template": False,
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


# ---------------------------------------------------------------------------------------------
# every suite through the real engine, on a tiny real model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> ModelRef:
    from gauntlet.demo.model import build_demo_model

    path = build_demo_model("tiny-llama", out=tmp_path_factory.mktemp("models") / "tiny-llama")
    return ModelRef(name="tiny-llama", path=str(path), source="demo://tiny-llama", sha="tiny-test")


@pytest.fixture(scope="module")
def demo_eval_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    demo_data.write_jsonl(path, demo_data.build(48, 7)["eval"])
    return path


@pytest.fixture(scope="module")
def all_suites_report(tiny_model, demo_eval_data, tmp_path_factory):
    """One evaluation of every suite's fixtures (and the demo's own tasks): 9 tasks, limit 4 items each."""
    tasks = [t for s in ALL_SUITES for t in load_catalog(EVALS).suites[s].tasks]
    spec = EvalSpec(tasks=list(dict.fromkeys(tasks)), fixtures=True, num_fewshot=1, limit=LIMIT,
                    max_gen_tokens=12, speed_probe=SpeedProbeSpec(prompts=3, max_new_tokens=4, large_batch=6))
    out = tmp_path_factory.mktemp("all-suites")
    return spec, evaluate_model(spec, tiny_model, str(demo_eval_data), out, variant="base"), out


@pytest.mark.slow
def test_every_suite_fixture_runs_through_the_engine(all_suites_report) -> None:
    spec, report, out = all_suites_report
    names = ["mmlu", "arc_challenge", "hellaswag", "gsm8k", "ceval-valid", "cmmlu", "bbh", "demo_facts",
             "demo_facts_gen"]
    assert [r.task for r in report.task_results] == names
    for r in report.task_results:
        assert r.value is not None and 0.0 <= r.value <= 1.0, r
        assert r.stderr is None or r.stderr >= 0
        assert r.normalized == pytest.approx(normalized_score(r.value, r.random_baseline))
        assert 0.0 <= r.normalized <= 100.0
        assert r.num_fewshot == 1 and r.limit == LIMIT
        assert r.task in r.versions and all(n == LIMIT for n in r.n_samples.values()), r.n_samples
        assert Path(r.results_path).is_file() and Path(r.samples_path).is_file()
        assert report.score(r.task, r.metric) == r.value
    by_name = {r.task: r for r in report.task_results}
    # baselines: declared in suites.yaml / the task YAML, or measured from the items scored (demo_facts
    # declares none: 4 choices per item)
    assert (by_name["mmlu"].random_baseline, by_name["mmlu"].random_baseline_source) == (0.25, "declared")
    assert (by_name["demo_facts_gen"].random_baseline, by_name["demo_facts_gen"].random_baseline_source) == \
        (0.0, "declared")
    assert by_name["demo_facts"].random_baseline == pytest.approx(0.25)
    assert by_name["demo_facts"].random_baseline_source == f"mean of 1/choices over {LIMIT} items"
    # groups: subtasks reported under the real tasks' names, aggregated by the engine (weighted mean)
    for group, subtasks in {"mmlu": ["mmlu_elementary_mathematics", "mmlu_high_school_geography"],
                            "ceval-valid": ["ceval-valid_computer_network", "ceval-valid_high_school_mathematics"],
                            "cmmlu": ["cmmlu_high_school_geography", "cmmlu_elementary_mathematics"],
                            "bbh": ["bbh_cot_fewshot_boolean_expressions", "bbh_cot_fewshot_multistep_arithmetic_two"]
                            }.items():
        metric = by_name[group].metric
        parts = [report.score(s, metric) for s in subtasks]
        assert None not in parts, (group, subtasks)
        assert by_name[group].value == pytest.approx(sum(parts) / len(parts))  # equal sizes (the limit)
        assert set(by_name[group].n_samples) == set(subtasks)
    assert by_name["gsm8k"].metric == "exact_match,strict-match"
    assert report.score("gsm8k", "exact_match,flexible-extract") is not None
    assert by_name["bbh"].metric == "exact_match,get-answer"
    assert report.versions["tasks"]["gsm8k"] == "3.0" and report.versions["tasks"]["mmlu"] == "2"

    assert set(report.normalized) == set(names)
    assert report.average_normalized == pytest.approx(sum(report.normalized.values()) / len(names))
    perf = report.perf
    assert perf.backend == "hf" and perf.device == "cpu" and perf.large_batch == 6
    assert perf.tokens_per_s > 0 and perf.tokens_per_s_large_batch > 0
    assert 0 < perf.ttft_p50_ms <= perf.ttft_p95_ms and perf.first_token_latency_ms > 0
    assert perf.peak_memory_gb > 0 and 0 < perf.size_on_disk_gb < 0.01

    assert report.protocol["fixtures"] is True and report.protocol["decoding"] == "greedy"
    assert report.protocol["task_versions"]["mmlu"]["mmlu_elementary_mathematics"] == "1.0"
    saved = json.loads((out / "report.json").read_text())
    for key in ("model", "model_sha", "variant", "scores", "task_results", "normalized", "average_normalized",
                "perf", "protocol", "versions", "timestamp"):
        assert key in saved, key
    assert load_report(out / "report.json") == report
    require_same_protocol([report, report])
    with pytest.raises(EvalError, match="different protocols.*fixtures"):
        require_same_protocol([report, report.model_copy(update={"protocol": {**report.protocol, "fixtures": False}})])


def test_fixture_prompts_are_the_engines_prompts(all_suites_report) -> None:
    """What the model saw: lm-eval's MMLU / GSM8K / C-Eval prompt formats, filled from our rows."""
    _, report, _ = all_suites_report
    by_name = {r.task: r for r in report.task_results}
    mmlu = [json.loads(line) for line in Path(by_name["mmlu"].samples_path).read_text().splitlines()]
    sample = next(s for s in mmlu if s["task"] == "mmlu_elementary_mathematics")
    doc = sample["doc"]
    context, continuation = sample["arguments"][0]
    assert context.startswith("The following are multiple choice questions (with answers) about elementary "
                              "mathematics.\n\n")  # the subject's description, then one dev-split shot
    assert context.endswith(f"{doc['question']}\nA. {doc['choices'][0]}\nB. {doc['choices'][1]}\n"
                            f"C. {doc['choices'][2]}\nD. {doc['choices'][3]}\nAnswer:")
    assert continuation == " A"
    gsm = json.loads(Path(by_name["gsm8k"].samples_path).read_text().splitlines()[0])
    prompt = gsm["arguments"][0][0]
    assert prompt.endswith(f"Question: {gsm['doc']['question']}\nAnswer:") and "#### " in prompt  # 1 shot
    assert gsm["target"] == gsm["doc"]["answer"]
    ceval = json.loads(Path(by_name["ceval-valid"].samples_path).read_text().splitlines()[0])
    assert ceval["arguments"][0][0].endswith("\n答案：")


@pytest.mark.slow
def test_wrapper_scores_equal_the_engines_cli(tiny_model, tmp_path: Path) -> None:
    """``lm_eval run --model hf …`` on the same model and fixture data gives exactly our scores."""
    spec = EvalSpec(tasks=["arc_challenge", "mmlu"], fixtures=True, num_fewshot=1, limit=6, batch_size=8,
                    speed_probe=SpeedProbeSpec(enabled=False))
    ours = evaluate_model(spec, tiny_model, None, tmp_path / "ours")

    cli_out = tmp_path / "cli"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={tiny_model.path},dtype=float32",
           "--tasks", "fixture_arc_challenge", "fixture_mmlu", "--include_path", "evals",
           "--num_fewshot", "1", "--limit", "6", "--batch_size", "8", "--device", "cpu", "--seed", "1234",
           "--output_path", str(cli_out)]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = cli_out.rglob("results_*.json")
    cli = json.loads(results_file.read_text())["results"]

    pairs = [("arc_challenge", "fixture_arc_challenge", "acc"), ("arc_challenge", "fixture_arc_challenge", "acc_norm"),
             ("mmlu", "fixture_mmlu", "acc"),
             ("mmlu_elementary_mathematics", "fixture_mmlu_elementary_mathematics", "acc"),
             ("mmlu_high_school_geography", "fixture_mmlu_high_school_geography", "acc")]
    for our_name, cli_name, metric in pairs:
        assert ours.score(our_name, metric) == cli[cli_name][f"{metric},none"], (our_name, metric)
