"""Evaluation stage: real lm-eval, a real (tiny, random-init) model, real files, through the evaluate flow
(resolve → fetch → the evaluate stage, as ``gauntlet eval`` and the finetune flow run it). Nothing mocked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gauntlet.config.eval import EvalSpec, SpeedProbeSpec
from gauntlet.demo import data as demo_data
from gauntlet.eval.protocol import protocol_of
from gauntlet.eval.report import load_report
from gauntlet.hashing import sha256_dir
from gauntlet.prompting import format_prompt
from tests.helpers import evaluate_in_flow

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_evaluate_tiny_model_end_to_end(prefect_api, tmp_path: Path, tiny_model: Path) -> None:
    splits = demo_data.build(48, 7)
    data = tmp_path / "data" / "eval.jsonl"
    demo_data.write_jsonl(data, splits["eval"])
    path = tiny_model
    spec = EvalSpec(tasks=["demo_facts"], limit=16, batch_size=16,
                    speed_probe=SpeedProbeSpec(prompts=2, max_new_tokens=8))

    report = evaluate_in_flow(path, spec, eval_file=data)

    acc = report.score("demo_facts", "acc")
    assert acc is not None and 0.0 <= acc <= 1.0
    by_metric = {s.metric: s for s in report.scores if s.task == "demo_facts"}
    assert {"acc", "acc_norm"} <= set(by_metric)
    assert by_metric["acc"].stderr is not None and by_metric["acc"].stderr >= 0
    assert report.perf is not None
    assert report.perf.backend == "hf" and report.perf.device in ("cpu", "cuda")
    assert report.perf.tokens_per_s > 0 and report.perf.first_token_latency_ms > 0
    assert report.perf.peak_memory_gb > 0 and report.perf.size_on_disk_gb > 0
    # what lm-eval applied and the model's fingerprint are known after the run; the rest is the planned protocol
    after = ("task_versions", "task_effective", "model_fingerprint")
    assert {k: v for k, v in report.protocol.items() if k not in after} == protocol_of(spec)
    assert report.protocol["task_effective"]["demo_facts"]["demo_facts"]["num_fewshot"] == 0
    assert report.protocol["task_versions"] == {"demo_facts": {"demo_facts": "1.0"}}
    assert report.protocol["limit"] == 16 and report.protocol["decoding"] == "each task's own"
    assert report.versions["tasks"] == {"demo_facts": "1.0"}
    assert {"lm_eval", "transformers", "torch"} <= set(report.versions)
    assert report.model.endswith("tiny-llama") and report.model_sha == sha256_dir(path) and report.variant == "base"
    assert report.mlflow_run_id

    saved = json.loads(Path(report.report_path).read_text())
    for key in ("model", "model_sha", "variant", "scores", "perf", "protocol", "versions", "timestamp"):
        assert key in saved
    assert saved["timestamp"].endswith("+00:00")
    assert load_report(report.report_path) == report.model_copy(update={"mlflow_run_id": None})
    (task,) = report.task_results
    raw = json.loads(Path(task.results_path).read_text())
    assert raw["n-samples"]["demo_facts"]["effective"] == 16
    samples = Path(task.samples_path).read_text().splitlines()
    assert len(samples) == 16
    # the model saw exactly the training prompt, answer appended with no delimiter, from the file it was given
    first = json.loads(samples[0])
    context, continuation = first["arguments"][0]
    assert context == format_prompt(first["doc"]["instruction"], first["doc"]["input"])
    assert continuation == first["doc"]["choices"][0]
    assert first["doc"]["instruction"] in {row["instruction"] for row in splits["eval"]}
