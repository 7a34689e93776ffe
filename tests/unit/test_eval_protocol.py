"""The evaluation's pieces without a model: the demo task's prompt is the training prompt, missing task YAMLs
and data say so, lm-eval's results are read, the vLLM backend gets the protocol, the normalization, and
`gauntlet eval`'s bad input. A real model is evaluated in tests/integration/test_evaluate.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from gauntlet.config.eval import EvalSpec
from gauntlet.demo import data as demo_data
from gauntlet.eval.engine import EvalError
from gauntlet.eval.protocol import plans_of, protocol_of
from gauntlet.eval.records import scores_from_results
from gauntlet.eval.taskconfig import task_config
from gauntlet.prompting import format_prompt
from tests.helpers import REPO

EVALS = REPO / "evals"

ROWS = [
    {"instruction": "What is the favourite colour of Kaloter?", "input": "",
     "choices": ["red", "blue", "green", "white"], "answer": 2},
    {"instruction": "Summarise the text.", "input": "Line one.\nLine two: {braces} & <tags>.",
     "choices": ["a", "b", "c", "d"], "answer": 0},
]


def test_demo_facts_prompt_matches_format_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The YAML's Jinja template, rendered by lm-eval itself, is exactly the training prompt."""
    monkeypatch.setenv("GAUNTLET_HOME", str(tmp_path / "home"))  # the datasets cache goes there
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.utils import apply_template

    raw = yaml.safe_load((EVALS / "demo_facts.yaml").read_text())
    assert raw["target_delimiter"] == ""
    for row in ROWS:
        assert apply_template(raw["doc_to_text"], row) == format_prompt(row["instruction"], row["input"])
    # a row without the input field at all renders like an empty input
    only = {"instruction": "Name a colour.", "choices": ["red"], "answer": 0}
    assert apply_template(raw["doc_to_text"], only) == format_prompt("Name a colour.")

    # and through the task lm-eval builds from the config evaluate.py hands it (data path substituted)
    data = tmp_path / "eval.jsonl"
    demo_data.write_jsonl(data, ROWS)
    task = ConfigurableTask(config=task_config("demo_facts", EVALS, str(data)))
    docs = list(task.test_docs())
    assert len(docs) == len(ROWS)
    for doc, row in zip(docs, ROWS, strict=True):
        assert task.fewshot_context(doc, 0) == format_prompt(row["instruction"], row["input"])
        assert task.doc_to_choice(doc) == row["choices"]
        assert task.doc_to_target(doc) == row["answer"]


def test_missing_task_yaml_names_task_and_folder(tmp_path: Path) -> None:
    suite = tmp_path / "suite"
    suite.mkdir()
    shutil.copy(EVALS / "demo_facts.yaml", suite / "demo_facts.yaml")
    spec = EvalSpec(tasks_dir=str(suite), tasks=["demo_facts"])  # valid when loaded …
    (suite / "demo_facts.yaml").unlink()                          # … gone when it runs
    with pytest.raises(EvalError) as err:
        plans_of(spec)   # what the evaluate stage does first, before any model loads
    assert "demo_facts" in str(err.value) and str(suite) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_missing_eval_data_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="demo_facts.*not found"):
        task_config("demo_facts", EVALS, str(tmp_path / "missing.jsonl"))


def test_scores_from_results_reads_metrics_filters_and_na_stderr() -> None:
    results = {"results": {"t": {
        "alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
        "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
    }}}
    scores = {(s.task, s.metric): s for s in scores_from_results(results)}
    assert scores[("t", "acc")].value == 0.5 and scores[("t", "acc")].stderr is None
    assert scores[("t", "exact_match,strict-match")].stderr == 0.1
    assert len(scores) == 2


def test_vllm_backend_receives_the_protocol_and_says_when_it_cannot_run(tmp_path: Path) -> None:
    """What vllm would be handed (it is not installed here: the `gpu` extra), and the error without it."""
    from importlib.util import find_spec

    from gauntlet.eval.engine import check_backend, engine_model_args

    spec = EvalSpec(tasks=["demo_facts"], backend="vllm", tensor_parallel_size=4, gpu_memory_utilization=0.8,
                    max_model_len=4096, batch_size=32, fewshot_seed=7)
    assert engine_model_args(spec, "/models/m", "cuda") == ("vllm", {
        "pretrained": "/models/m", "dtype": "auto", "tensor_parallel_size": 4, "gpu_memory_utilization": 0.8,
        "seed": 7, "batch_size": 32, "max_model_len": 4096})
    hf = EvalSpec(tasks=["demo_facts"])
    assert engine_model_args(hf, "/models/m", "cpu") == ("hf", {"pretrained": "/models/m", "dtype": "float32"})
    assert engine_model_args(hf, "/models/m", "cuda") == ("hf", {"pretrained": "/models/m", "dtype": "auto"})
    check_backend(hf, "cpu")  # hf runs anywhere
    if find_spec("vllm") is None:
        with pytest.raises(EvalError, match=r"vllm package is not installed.*llm-gauntlet\[gpu\]"):
            check_backend(spec, "cuda")
    else:  # a GPU image with vllm: on a machine without CUDA it must say so
        with pytest.raises(EvalError, match="needs a CUDA GPU"):
            check_backend(spec, "cpu")
    # the protocol records the backend, so hf and vllm reports are never ranked together silently
    assert protocol_of(spec)["backend"] == "vllm" and protocol_of(spec)["max_model_len"] == 4096


def test_normalization_is_the_open_llm_leaderboards() -> None:
    from gauntlet.eval.suites import normalized_score

    assert normalized_score(0.25, 0.25) == 0.0
    assert normalized_score(1.0, 0.25) == 100.0
    assert normalized_score(0.625, 0.25) == pytest.approx(50.0)
    assert normalized_score(0.10, 0.25) == 0.0          # below chance counts as chance
    assert normalized_score(0.42, 0.0) == pytest.approx(42.0)
    with pytest.raises(ValueError):
        normalized_score(0.5, 1.0)                      # a task anyone aces by chance cannot be normalized


def test_eval_cli_rejects_bad_input_with_exit_2(capsys: pytest.CaptureFixture) -> None:
    from gauntlet.cli import main

    assert main(["eval", "/no/such/model", "--suite", "en-cor", "--set", "limit=0"]) == 2
    err = capsys.readouterr().err
    assert "model.source" in err and "eval.suite: unknown suite 'en-cor'" in err and "eval.limit" in err


def test_an_answer_that_changed_between_repeats_is_named() -> None:
    from gauntlet.eval.records import changed_answers

    def rows(*answers):
        return {"facts": [{"doc_id": i, "filtered_resps": [a]} for i, a in enumerate(answers)]}

    assert changed_answers([rows("red", "blue"), rows("red", "blue")]) == []
    assert changed_answers([rows("red", "blue"), rows("red", "blue"), rows("red", "green")]) == ["facts/1"]


def test_the_model_fingerprint_holds_what_acts_on_the_decoding_and_the_gate_names_it(tmp_path) -> None:
    import json

    from gauntlet.eval.protocol import model_fingerprint, task_differences

    def folder(name: str, generation: dict, template: str) -> str:
        path = tmp_path / name
        path.mkdir()
        (path / "generation_config.json").write_text(json.dumps(generation))
        (path / "chat_template.jinja").write_text(template)
        return str(path)

    qwen_like = folder("a", {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "transformers_version": "5"}, "T1")
    llama_like = folder("b", {"temperature": 0.6, "transformers_version": "4"}, "T1")
    repeating = folder("c", {"repetition_penalty": 1.1}, "T2")
    # sampling fields do nothing under greedy decoding: two families compare
    assert model_fingerprint(qwen_like, False) == model_fingerprint(llama_like, False)
    assert model_fingerprint(qwen_like, False, sampled=True) != model_fingerprint(llama_like, False, sampled=True)
    a = {"task_settings": {}, "model_fingerprint": model_fingerprint(llama_like, True)}
    b = {"task_settings": {}, "model_fingerprint": model_fingerprint(repeating, True)}
    diff = task_differences(a, b, "facts")
    assert any(d.startswith("model_fingerprint.generation_config.repetition_penalty") for d in diff), diff
    assert any(d.startswith("model_fingerprint.chat_template_sha") for d in diff), diff
