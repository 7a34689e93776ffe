"""The evaluation stage under Prefect and MLflow: cached per task, and failing clearly.

Real Prefect (the session's test API), real sqlite MLflow, lm-eval on a tiny real model; the evaluate
flow (``flows/evaluate.py``, what ``gauntlet eval`` runs). Which tasks were evaluated is read back from
Prefect's task run states, and how often the model was loaded from the MLflow run. Nothing is mocked.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gauntlet.config.eval import EvalSpec, SpeedProbeSpec
from gauntlet.config.model import ModelSpec
from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
PROBE = SpeedProbeSpec(prompts=2, max_new_tokens=4, large_batch=4)


@pytest.fixture(scope="module")
def model_dir(tiny_model: Path) -> Path:
    return tiny_model


def spec_with(*tasks: str | dict, **kw) -> EvalSpec:
    return EvalSpec(tasks=list(tasks), fixtures=True, num_fewshot=0, limit=3, max_gen_tokens=8, speed_probe=PROBE, **kw)


def run_eval(model: Path | str, spec: EvalSpec, variant: str = "base"):
    from gauntlet.flows.evaluate import evaluate_flow

    return evaluate_flow(model=ModelSpec(source=str(model)), spec=spec, variant=variant,
                         experiment="gauntlet-eval-tests", return_state=True)


def task_states(state) -> dict[str, str]:
    """Task run name -> final state name for one flow run, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    return {r.name: r.state.name for r in runs if not r.name.startswith(("fetch_model", "resolve-"))}


def mlflow_run(run_id: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    return c, c.get_run(run_id)


def test_unchanged_suite_costs_nothing_and_an_added_task_runs_alone(prefect_api, model_dir) -> None:
    first = run_eval(model_dir, spec_with("arc_challenge", "hellaswag"))
    assert first.is_completed(), first.message
    assert task_states(first) == {"evaluate-base": "Completed", "score-base-arc_challenge": "Completed",
                                  "score-base-hellaswag": "Completed", "speed-probe-base": "Completed"}
    report = first.result()
    c, run = mlflow_run(report.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["engine_loads"] == 1
    assert {"arc_challenge.acc_norm", "hellaswag.acc_norm", "arc_challenge.normalized",
            "average_normalized", "perf.tokens_per_s", "perf.tokens_per_s_large_batch",
            "perf.ttft_p95_ms"} <= set(run.data.metrics)
    assert run.data.params["eval.decoding"] == "each task's own" and run.data.params["eval.fewshot_seed"] == "1234"
    assert run.data.params["eval.task_settings.arc_challenge.engine_task"] == "fixture_arc_challenge"
    assert {"report.json", "report.md"} <= {a.path for a in c.list_artifacts(run.info.run_id)}
    nested = c.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {r.info.run_name for r in nested} == {"score-base-arc_challenge", "score-base-hellaswag",
                                                 "speed-probe-base"}

    # the same model, the same suite: one cache hit, no task evaluated, the same report
    again = run_eval(model_dir, spec_with("arc_challenge", "hellaswag"))
    assert again.is_completed()
    assert task_states(again) == {"evaluate-base": "Cached"}
    assert again.result().task_results == report.task_results

    # one task added: only that task is evaluated (one model load); the others and the probe are cached
    grown = run_eval(model_dir, spec_with("arc_challenge", "hellaswag", "gsm8k"))
    assert grown.is_completed(), grown.message
    assert task_states(grown) == {"evaluate-base": "Completed", "score-base-arc_challenge": "Cached",
                                  "score-base-hellaswag": "Cached", "score-base-gsm8k": "Completed",
                                  "speed-probe-base": "Cached"}
    grown_report = grown.result()
    assert [r.task for r in grown_report.task_results] == ["arc_challenge", "hellaswag", "gsm8k"]
    assert grown_report.task_results[:2] == report.task_results  # the cached results, reused as they were
    _, run = mlflow_run(grown_report.mlflow_run_id)
    assert run.data.metrics["engine_loads"] == 1 and "gsm8k.exact_match/strict-match" in run.data.metrics

    # a subset of what was evaluated: nothing runs and the model is never loaded
    subset = run_eval(model_dir, spec_with("gsm8k"))
    assert task_states(subset) == {"evaluate-base": "Completed", "score-base-gsm8k": "Cached",
                                   "speed-probe-base": "Cached"}
    _, run = mlflow_run(subset.result().mlflow_run_id)
    assert run.data.metrics["engine_loads"] == 0

    # a changed protocol (few-shot count of one task) re-evaluates exactly that task
    changed = run_eval(model_dir, spec_with({"name": "arc_challenge", "num_fewshot": 1}, "gsm8k"))
    assert task_states(changed) == {"evaluate-base": "Completed", "score-base-arc_challenge": "Completed",
                                    "score-base-gsm8k": "Cached", "speed-probe-base": "Cached"}


def test_a_registered_model_is_evaluated_by_its_alias(prefect_api, model_dir, capsys) -> None:
    from mlflow.tracking import MlflowClient

    from gauntlet.cli import main
    from gauntlet.tracking import tracking_uri
    from tests.helpers import register_as_champion

    spec = spec_with("arc_challenge")
    assert run_eval(model_dir, spec).is_completed()
    version = register_as_champion(MlflowClient(tracking_uri()), "eval-registry-tests", model_dir, "eval-by-alias",
                                   {"test": "eval"})
    state = run_eval("models:/eval-by-alias@champion", spec)
    assert state.is_completed(), state.message
    # the version's files are the folder evaluated above: the same content hash, so nothing is evaluated again
    assert task_states(state) == {"evaluate-base": "Cached"}
    assert state.result().model_sha == run_eval(model_dir, spec).result().model_sha
    # a cache hit from the folder's evaluation, named as asked: the registered version
    assert state.result().model == f"eval-by-alias-v{version}"
    c = MlflowClient(tracking_uri())
    resolved = c.search_runs([c.get_experiment_by_name("gauntlet-eval-tests").experiment_id],
                             "attributes.run_name = 'fetch_model'", order_by=["attributes.start_time DESC"])
    assert any(r.data.tags.get("model.path", "").endswith(f"registry/eval-by-alias/{version}") for r in resolved)

    # the command line takes the same URI; an alias that is not set fails clearly, before any evaluation
    assert main(["eval", "models:/eval-by-alias@nope", "--fixtures", "--task", "arc_challenge"]) == 1
    err = capsys.readouterr().err
    assert "models:/eval-by-alias@nope: registered model 'eval-by-alias' has no alias @nope" in err
    assert main(["eval", "models:/eval-by-alias", "--fixtures", "--task", "arc_challenge"]) == 2
    assert "must look like models:/NAME@alias or models:/NAME/VERSION" in capsys.readouterr().err


def _failed_runs(report_experiment: str = "gauntlet-eval-tests"):
    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    exp = c.get_experiment_by_name(report_experiment)
    return c, c.search_runs([exp.experiment_id], "attributes.status = 'FAILED'",
                            order_by=["attributes.start_time DESC"])


def test_missing_data_file_fails_naming_the_task_and_keeps_what_was_done(prefect_api, model_dir, tmp_path) -> None:
    tasks_dir = tmp_path / "evals"
    tasks_dir.mkdir()
    shutil.copy(REPO / "evals" / "fixtures" / "arc_challenge" / "fixture_arc_challenge.yaml", tasks_dir)
    (tasks_dir / "my_task.yaml").write_text(
        "task: my_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: data/nowhere/my_task.jsonl\n"
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: 0\n")
    spec = EvalSpec(tasks_dir=str(tasks_dir), tasks=["fixture_arc_challenge", "my_task"], limit=3,
                    speed_probe=PROBE)
    state = run_eval(model_dir, spec, variant="broken-data")
    assert state.is_failed()
    assert "my_task" in state.message and "data/nowhere/my_task.jsonl" in state.message
    states = task_states(state)
    assert states["score-broken-data-fixture_arc_challenge"] == "Completed"
    assert states["score-broken-data-my_task"] == "Failed" and states["evaluate-broken-data"] == "Failed"

    c, failed = _failed_runs()
    by_name = {r.info.run_name: r for r in failed}
    stage = by_name["evaluate-broken-data"]
    assert "my_task" in stage.data.tags["gauntlet.error"]
    assert "fixture_arc_challenge.acc" in stage.data.metrics  # what was done before the failure is kept
    assert "error.txt" in {a.path for a in c.list_artifacts(stage.info.run_id)}
    assert "my_task" in by_name["score-broken-data-my_task"].data.tags["gauntlet.error"]
    parent = c.get_run(stage.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"


def test_model_that_does_not_load_and_missing_vllm_fail_clearly(prefect_api, model_dir, tmp_path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": 7}')
    # a well-formed safetensors file (so fetch_model's integrity check passes) that fits no Llama
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(broken / "model.safetensors"))
    state = run_eval(broken, spec_with("arc_challenge"), variant="broken-model")
    assert state.is_failed()
    assert str(broken) in state.message and "failed to load with the hf backend" in state.message
    _, failed = _failed_runs()
    assert "failed to load" in {r.info.run_name: r for r in failed}["evaluate-broken-model"].data.tags["gauntlet.error"]

    # vllm is not installed here (it is the `gpu` extra): the stage says so, before loading anything
    state = run_eval(model_dir, spec_with("arc_challenge", backend="vllm", tensor_parallel_size=2), variant="vllm")
    assert state.is_failed()
    assert "vllm" in state.message and "llm-gauntlet[gpu]" in state.message
    _, failed = _failed_runs()
    assert "llm-gauntlet[gpu]" in {r.info.run_name: r for r in failed}["evaluate-vllm"].data.tags["gauntlet.error"]
