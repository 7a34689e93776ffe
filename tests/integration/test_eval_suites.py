"""Suites, fixtures and the protocol: every suite's fixture path through the real lm-eval engine on a
tiny real model, the fixtures checked against the engine's own task definitions, and our scores checked
against the engine's own CLI on the same model and data. Every evaluation goes through the evaluate flow
(the evaluate stage and its cached score stages, as production runs them). Nothing is mocked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gauntlet.config.eval import EvalSpec, SpeedProbeSpec
from gauntlet.demo import data as demo_data
from gauntlet.eval.engine import EvalError
from gauntlet.eval.protocol import (
    require_same_protocol,
)
from gauntlet.eval.report import load_report
from gauntlet.eval.suites import load_catalog, normalized_score
from tests.helpers import REPO, evaluate_in_flow

EVALS = REPO / "evals"

ALL_SUITES = ("en-core", "zh-core", "reasoning", "demo")

LIMIT = 4


pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def demo_eval_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "eval.jsonl"
    demo_data.write_jsonl(path, demo_data.build(48, 7)["eval"])
    return path


@pytest.fixture(scope="module")
def all_suites_report(prefect_api, tiny_model, demo_eval_data):
    """One evaluation of every suite's fixtures (and the demo's own tasks): 9 tasks, limit 4 items each."""
    tasks = [t for s in ALL_SUITES for t in load_catalog(EVALS).suites[s].tasks]
    spec = EvalSpec(tasks=list(dict.fromkeys(tasks)), fixtures=True, num_fewshot=1, limit=LIMIT,
                    max_gen_tokens=12, speed_probe=SpeedProbeSpec(prompts=3, max_new_tokens=4, large_batch=6))
    return spec, evaluate_in_flow(tiny_model, spec, eval_file=demo_eval_data)


@pytest.mark.slow
def test_every_suite_fixture_runs_through_the_engine(all_suites_report) -> None:
    spec, report = all_suites_report
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

    assert report.protocol["fixtures"] is True and report.protocol["decoding"] == "each task's own"
    assert report.protocol["task_versions"]["mmlu"]["mmlu_elementary_mathematics"] == "1.0"
    saved = json.loads(Path(report.report_path).read_text())
    for key in ("model", "model_sha", "variant", "scores", "task_results", "normalized", "average_normalized",
                "perf", "protocol", "versions", "timestamp"):
        assert key in saved, key
    assert load_report(report.report_path) == report.model_copy(update={"mlflow_run_id": None})
    require_same_protocol([report, report])
    with pytest.raises(EvalError, match="different protocols.*fixtures"):
        require_same_protocol([report, report.model_copy(update={"protocol": {**report.protocol, "fixtures": False}})])


def test_fixture_prompts_are_the_engines_prompts(all_suites_report) -> None:
    """What the model saw: lm-eval's MMLU / GSM8K / C-Eval prompt formats, filled from our rows."""
    _, report = all_suites_report
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
def test_our_scores_equal_the_engines_cli(prefect_api, tiny_model, tmp_path: Path) -> None:
    """``lm_eval run --model hf …`` on the same model and fixture data gives exactly our scores."""
    spec = EvalSpec(tasks=["arc_challenge", "mmlu"], fixtures=True, num_fewshot=1, limit=6, batch_size=8,
                    speed_probe=SpeedProbeSpec(enabled=False))
    ours = evaluate_in_flow(tiny_model, spec)

    cli_out = tmp_path / "cli"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_DATASETS_CACHE": str(tmp_path / "hf-cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={tiny_model},dtype=float32",
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


def test_a_task_yamls_own_few_shot_count_holds_unless_the_config_sets_one(prefect_api, tiny_model) -> None:
    """BBH's fixture YAML says ``num_fewshot: 3``: evaluated 3-shot and reported as 3, unless eval sets it."""
    task = "fixture_bbh_cot_fewshot_boolean_expressions"
    common = dict(tasks=[task], limit=2, max_gen_tokens=4, speed_probe=SpeedProbeSpec(enabled=False))
    own = evaluate_in_flow(tiny_model, EvalSpec(**common)).task_results[0]
    assert own.num_fewshot == 3 and own.effective[task]["num_fewshot"] == 3
    prompt = json.loads(Path(own.samples_path).read_text().splitlines()[0])["arguments"][0][0]
    assert prompt.count("Q: ") == 4  # three worked examples, then the question
    assert own.effective[task]["generation_kwargs"]["max_gen_toks"] == 4  # the config set this one
    overridden = evaluate_in_flow(tiny_model, EvalSpec(**common, num_fewshot=1)).task_results[0]
    assert overridden.num_fewshot == 1


def test_repeats_record_their_seeds_and_check_greedy_determinism(prefect_api, tiny_model, demo_eval_data) -> None:
    """eval.repeats: sampled decoding reports each repeat (mean ± sd, distinct seeds); greedy repeats agree."""
    from gauntlet.eval.report import report_markdown

    common = dict(tasks=["demo_facts_gen"], limit=12, max_gen_tokens=6, speed_probe=SpeedProbeSpec(enabled=False))
    sampled = evaluate_in_flow(tiny_model, EvalSpec(**common, repeats=3, temperature=1.0), eval_file=demo_eval_data)
    result = sampled.task_results[0]
    assert result.repeat_seeds == [1234, 1235, 1236] and len(result.repeat_values) == 3
    assert result.value == pytest.approx(sum(result.repeat_values) / 3)
    rows = [json.loads(line) for line in Path(result.samples_path).read_text().splitlines()]
    assert {r["seed"] for r in rows} == {1234, 1235, 1236}
    answers = {seed: [r["resps"] for r in rows if r["seed"] == seed and r["filter"] == "first-word"]
               for seed in (1234, 1235, 1236)}
    assert answers[1234] != answers[1235]  # the sampling seed really changed what was generated
    assert "3 repeats (seeds [1234, 1235, 1236])" in report_markdown(sampled) and "± sd" in report_markdown(sampled)

    greedy = evaluate_in_flow(tiny_model, EvalSpec(**common, repeats=2, temperature=0.0),
                              eval_file=demo_eval_data).task_results[0]
    assert greedy.changed_items == [] and greedy.repeat_values[0] == greedy.repeat_values[1]
