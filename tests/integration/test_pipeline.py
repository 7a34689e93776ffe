"""The demo pipeline end to end: real Prefect (test API), real sqlite MLflow, a real DVC repo with a
local remote, a real tiny model trained with QLoRA under `accelerate launch`. Nothing is mocked.

One module-scoped DVC repo; the runs build on each other (first run, cached re-run, changed learning
rate, failing run), as a user would run them.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from gauntlet.hashing import sha256_dir
from tests.helpers import REPO

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
DEMO = str(REPO / "configs" / "demo.yaml")
HEAVY = ("pull_data", "fetch_model", "check_data", "train", "evaluate-base", "evaluate-finetuned",
         "quantize-gptq-w4g64", "evaluate-gptq-w4g64")


def task_states(flow_run_id) -> dict[str, str]:
    """Task run name → final state name, read back from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {_stage_name(r.name): r.state.name for r in runs}


def _stage_name(task_run_name: str) -> str:
    # Prefect names task runs "<task>-<3 hex>" unless the task names them (evaluate-/quantize-<variant>).
    named = task_run_name.startswith(("evaluate-", "quantize-"))
    return task_run_name if named else task_run_name.rsplit("-", 1)[0]


def run_demo(dvc_repo: Path, *overrides: str):
    from gauntlet.flows.finetune import finetune

    started = time.time()
    state = finetune(config=DEMO, overrides=[f"data.repo={dvc_repo}", *overrides], return_state=True)
    elapsed = time.time() - started
    return state, elapsed


def mlflow_client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def nested_runs(c, parent_id: str) -> dict[str, object]:
    parent = c.get_run(parent_id)
    runs = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["gauntlet.stage"] if "evaluate" not in r.info.run_name else r.info.run_name: r for r in runs}


SECRET = "hf_GauntletLeakCheck0123456789abcdef"


@pytest.fixture(scope="module")
def first_run(prefect_api, quantize_env, dvc_repo):
    os.environ["HF_TOKEN"] = SECRET          # as a user with a hub token would run it
    state, elapsed = run_demo(dvc_repo)
    assert state.is_completed(), state.message
    return state.result(), state.state_details.flow_run_id, elapsed


def test_first_run_trains_evaluates_and_promotes(first_run, dvc_repo) -> None:
    summary, flow_run_id, elapsed = first_run
    print(f"\nfirst run: {elapsed:.1f}s")
    states = task_states(flow_run_id)
    # this module's own state folder: nothing comes from another module's cache
    assert all(states[name] == "Completed" for name in HEAVY), states

    c = mlflow_client()
    parent = c.get_run(summary.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["prefect.flow_run_id"] == str(flow_run_id)
    stages = nested_runs(c, summary.mlflow_run_id)
    assert set(stages) >= {"pull_data", "train", "evaluate-finetuned", "quantize-gptq-w4g64",
                           "evaluate-gptq-w4g64", "gate", "promote"}, set(stages)
    assert all(r.info.status == "FINISHED" for r in stages.values())

    train_run = stages["train"].info.run_id
    assert "loss_curve.png" in {a.path for a in c.list_artifacts(train_run)}
    losses = c.get_metric_history(train_run, "train_loss")
    assert len(losses) >= 10 and losses[-1].value < losses[0].value / 4, [m.value for m in losses]
    assert "report.json" in {a.path for a in c.list_artifacts(stages["evaluate-finetuned"].info.run_id)}

    # the fine-tuned model beats its base clearly, because training worked (chance is 0.25)
    (acc,) = [s for s in summary.scores if s.metric == "acc"]
    print(f"demo_facts acc: base {acc.base:.3f} -> fine-tuned {acc.finetuned:.3f}")
    assert acc.base < 0.4 and acc.finetuned >= acc.base + 0.3
    assert summary.gate_passed
    # held-out perplexity (data.validation), base against fine-tuned: training lowered it, paired over the rows
    (ppl,) = [r for r in summary.gate_rules if r[0] == "max_perplexity_increase"]
    print(f"perplexity rule: {ppl[2]}")
    assert ppl[1] == "pass" and "relative change in %: Δ -" in ppl[2] and "), significant;" in ppl[2], ppl

    # the demo's GPTQ variant: evaluated like the fine-tuned model, shown beside it, registered (it passes)
    (variant,) = summary.variants
    print(f"gptq-w4g64: acc {variant.scores['demo_facts.acc']:.3f}, {variant.size_mb:.2f} MB "
          f"({variant.size_ratio:.2f}x of {summary.finetuned_size_mb:.2f} MB)")
    assert variant.variant == "gptq-w4g64" and variant.bits == 4 and variant.group_size == 64
    assert 0.2 < variant.size_ratio < 0.5
    assert variant.deltas["demo_facts.acc"] == pytest.approx(variant.scores["demo_facts.acc"] - acc.finetuned)
    assert variant.scores["demo_facts.acc"] >= 0.5
    markdown = summary.markdown()
    assert "| fine-tuned (unquantized) |" in markdown and "| gptq-w4g64 |" in markdown
    # the variant against its parent, item by item: the difference with its interval, not a bare delta
    assert variant.comparisons["demo_facts.acc"].startswith("Δ ") and "95% CI" in variant.comparisons["demo_facts.acc"]
    assert "Against the fine-tuned model, item by item" in markdown
    assert f"{variant.size_ratio:.2f}" in markdown
    quantize_run = stages["quantize-gptq-w4g64"].data
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())
    train_md5 = next(o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])
                     if o["path"] == "data/demo/train.jsonl")
    assert quantize_run.params["calibration.samples"] == "64"
    assert quantize_run.params["calibration.source_md5"] == train_md5   # calibrated on the run's DVC data
    assert quantize_run.metrics["size_ratio"] == pytest.approx(variant.size_ratio)
    assert "gauntlet-demo-gptq-w4g64 v1 is now @champion" in variant.registry
    registered = c.get_model_version_by_alias("gauntlet-demo-gptq-w4g64", "champion")
    assert registered.tags["model.sha"] == sha256_dir(Path(variant.path))
    # how the variant was made, on the version: method, bits, group size, what it came from, calibration
    quant = {k.removeprefix("quantization."): v for k, v in registered.tags.items() if k.startswith("quantization.")}
    assert quant == {"variant": "gptq-w4g64", "method": "gptq", "bits": "4", "group_size": "64",
                     "from_sha": sha256_dir(Path(summary.merged_model)), "calibration_md5": quant["calibration_md5"],
                     "size_ratio": f"{variant.size_ratio:.3f}"}
    assert len(quant["calibration_md5"]) == 32
    assert not any(k.startswith("quantization.") for k in c.get_model_version_by_alias("gauntlet-demo",
                                                                                         "champion").tags)

    version = c.get_model_version_by_alias("gauntlet-demo", "champion")
    assert str(version.version) == summary.registered_version
    for tag in ("data.md5", "base_model.sha", "config_hash", "git_commit", "prefect.flow_run_id",
                "score.demo_facts.acc"):
        assert version.tags.get(tag), tag
    assert version.tags["data.md5"] == summary.data_md5
    # the registered files load back with transformers
    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = download_artifacts(artifact_uri=version.source)
    model, tok = AutoModelForCausalLM.from_pretrained(local), AutoTokenizer.from_pretrained(local)
    assert model.config.hidden_size == 128 and tok.eos_token == "</s>"


def test_second_run_is_cached_and_adds_no_version(first_run, dvc_repo) -> None:
    summary1, _, first_elapsed = first_run
    state, elapsed = run_demo(dvc_repo)
    assert state.is_completed()
    print(f"\nfirst run {first_elapsed:.1f}s, cached re-run {elapsed:.1f}s ({elapsed / first_elapsed:.0%})")
    states = task_states(state.state_details.flow_run_id)
    assert all(states[name] == "Cached" for name in HEAVY), states
    summary = state.result()
    assert summary.registered_version == summary1.registered_version
    versions = mlflow_client().search_model_versions("name='gauntlet-demo'")
    assert len(versions) == 1


def test_learning_rate_change_retrains_only_what_depends_on_it(first_run, dvc_repo) -> None:
    state, _ = run_demo(dvc_repo, "train.learning_rate=0.002")
    assert state.is_completed(), state.message
    states = task_states(state.state_details.flow_run_id)
    assert states["pull_data"] == states["fetch_model"] == states["evaluate-base"] == "Cached", states
    assert states["train"] == states["evaluate-finetuned"] == "Completed", states
    assert states["quantize-gptq-w4g64"] == "Completed", states   # a new fine-tuned model: new variant


def test_cache_hit_whose_files_are_gone_recomputes(first_run, dvc_repo) -> None:
    summary, _, _ = first_run
    shutil.rmtree(Path(summary.merged_model).parent)   # the train stage's durable folder
    state, _ = run_demo(dvc_repo)
    assert state.is_completed(), state.message
    states = task_states(state.state_details.flow_run_id)
    assert states["train"] == "Completed" and states["pull_data"] == "Cached", states
    assert Path(summary.merged_model).exists()


def test_failed_run_is_marked_failed_and_registry_untouched(prefect_api, dvc_repo, tmp_path) -> None:
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("no weights here")
    c = mlflow_client()
    before = len(c.search_model_versions("name='gauntlet-demo'")) if c.search_registered_models() else 0
    state, _ = run_demo(dvc_repo, f"model.source={not_a_model}")
    assert state.is_failed()
    assert "not a model directory" in state.message
    exp = c.get_experiment_by_name("gauntlet-demo")
    failed = c.search_runs([exp.experiment_id], "attributes.status = 'FAILED'", order_by=["attributes.start_time DESC"])
    parent = next(r for r in failed if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    failed_stage = c.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' "
                                 "and tags.`gauntlet.stage` = 'fetch_model'")[0]
    assert failed_stage.info.status == "FAILED"
    assert "not a model directory" in failed_stage.data.tags["gauntlet.error"]
    assert "error.txt" in {a.path for a in c.list_artifacts(failed_stage.info.run_id)}
    assert len(c.search_model_versions("name='gauntlet-demo'")) == before


def test_secret_appears_nowhere(first_run, session_home: Path) -> None:
    """The hub token in the environment reaches no MLflow param/tag/artifact and no Prefect log."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    c = MlflowClient()
    checked = 0
    for exp in c.search_experiments():
        for run in c.search_runs([exp.experiment_id]):
            blob = repr(run.data.params) + repr(run.data.tags)
            assert SECRET not in blob, run.info.run_id
            checked += 1
    assert checked >= 8
    seen_logs, offset = 0, 0
    with get_client(sync_client=True) as client:
        while True:
            logs = client.read_logs(limit=200, offset=offset)
            assert not any(SECRET in log.message for log in logs)
            seen_logs += len(logs)
            if len(logs) < 200:
                break
            offset += 200
    assert seen_logs > 50  # the flow runs' logs were really read
    # and no file in the state folder: MLflow's database and artifacts, Prefect's database and results,
    # stage outputs (training arguments, reports)
    for path in session_home.rglob("*"):
        if path.is_file() and path.stat().st_size < 200 << 20:
            assert SECRET.encode() not in path.read_bytes(), path
