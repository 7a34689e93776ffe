"""Evaluation stage: real lm-eval, a real (tiny, random-init) model, real files. Nothing mocked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gauntlet.config.eval import EvalSpec, SpeedProbeSpec
from gauntlet.demo import data as demo_data
from gauntlet.eval.protocol import protocol_of
from gauntlet.eval.report import evaluate_model, load_report
from gauntlet.prompting import format_prompt
from gauntlet.refs import ModelRef


def test_evaluate_tiny_model_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gauntlet.demo.model import build_demo_model

    monkeypatch.setenv("GAUNTLET_HOME", str(tmp_path / "home"))
    splits = demo_data.build(48, 7)
    data = tmp_path / "data" / "eval.jsonl"
    demo_data.write_jsonl(data, splits["eval"])
    path = build_demo_model("tiny-llama", out=tmp_path / "m")
    model = ModelRef(name="tiny-llama", path=str(path), source="demo://tiny-llama", sha="x")
    spec = EvalSpec(tasks=["demo_facts"], limit=16, batch_size=16,
                    speed_probe=SpeedProbeSpec(prompts=2, max_new_tokens=8))
    out = tmp_path / "out"

    report = evaluate_model(spec, model, str(data), out, variant="base")

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
    assert report.model == "tiny-llama" and report.model_sha == "x" and report.variant == "base"

    saved = json.loads((out / "report.json").read_text())
    for key in ("model", "model_sha", "variant", "scores", "perf", "protocol", "versions", "timestamp"):
        assert key in saved
    assert saved["timestamp"].endswith("+00:00")
    assert Path(report.report_path) == out / "report.json"
    assert load_report(out / "report.json") == report
    raw = json.loads((out / "tasks" / "demo_facts" / "lm_eval_results.json").read_text())
    assert raw["n-samples"]["demo_facts"]["effective"] == 16
    samples = (out / "tasks" / "demo_facts" / "lm_eval_samples.jsonl").read_text().splitlines()
    assert len(samples) == 16
    # the model saw exactly the training prompt, answer appended with no delimiter
    first = json.loads(samples[0])
    context, continuation = first["arguments"][0]
    assert context == format_prompt(first["doc"]["instruction"], first["doc"]["input"])
    assert continuation == first["doc"]["choices"][0]
