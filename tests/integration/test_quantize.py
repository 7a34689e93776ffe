"""Quantization stage: real llm-compressor (in its own venv), real bitsandbytes, real transformers reloads,
real lm-eval evaluation, real Prefect and MLflow. Nothing mocked.

The demo's tiny Llama (hidden 128, intermediate 256) is quantized with GPTQ (group 32) and AWQ (group 64)
on the CPU, each variant is reloaded with transformers, checked to hold 4-bit grouped weights, generates,
and is evaluated by the normal evaluation task.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from gauntlet.config.eval import EvalSpec, SpeedProbeSpec
from gauntlet.config.quantize import CalibrationSpec, QuantizeVariant
from gauntlet.demo import data as demo_data
from gauntlet.hashing import sha256_dir
from gauntlet.prompting import format_prompt
from gauntlet.refs import DatasetRef, ModelRef

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CALIBRATION = CalibrationSpec(samples=8, max_seq_len=48, seed=3)  # small: AWQ's grid search is slow on a CPU


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_model: Path) -> tuple[ModelRef, DatasetRef]:
    """The demo's tiny model and data files (the DatasetRef a pull would return for them)."""
    root = tmp_path_factory.mktemp("quant")
    path = tiny_model
    splits = demo_data.build(48, 7)
    files = {}
    for split in ("train", "validation", "eval"):
        files[split] = root / "data" / f"{split}.jsonl"
        demo_data.write_jsonl(files[split], splits[split])
    md5 = {f"data/{s}.jsonl": hashlib.md5(f.read_bytes()).hexdigest() for s, f in files.items()}
    data = DatasetRef(repo=str(root), train_path=str(files["train"]), validation_path=str(files["validation"]),
                      eval_path=str(files["eval"]), md5=hashlib.md5(str(sorted(md5.items())).encode()).hexdigest(),
                      file_md5=md5, eval_md5=md5["data/eval.jsonl"], rows={s: len(v) for s, v in splits.items()})
    model = ModelRef(name="tiny-llama", path=str(path), source="demo://tiny-llama", sha=sha256_dir(path))
    return model, data


def _quantize_and_evaluate(variants: list[QuantizeVariant], model: ModelRef, data: DatasetRef, spec: EvalSpec):
    from prefect import flow
    from prefect.runtime import flow_run

    from gauntlet.tasks.evaluate import evaluate
    from gauntlet.tasks.quantize import quantize
    from gauntlet.tracking import parent_run, tracking_uri

    @flow(name="quantize-and-evaluate")
    def quantize_and_evaluate():
        with parent_run(tracking_uri(), "quantize-tests", "quantize-and-evaluate",
                        {"prefect.flow_run_id": str(flow_run.id)}, {}) as run:
            out = []
            for v in variants:
                q = quantize(variant=v, calibration=CALIBRATION, model=model, data=data, run=run)
                report = evaluate(spec=spec, model=q, data=data, variant=q.variant, run=run)
                out.append((q, report))
            return out

    return quantize_and_evaluate(return_state=True)


def assert_4bit_groups(layer, group_size: int, symmetric: bool) -> None:
    """The layer holds 4-bit weights packed eight to an int32, one scale per ``group_size`` inputs (and a
    zero point per group when asymmetric), and no float weight: it runs compressed."""
    import torch

    params = dict(layer.named_parameters())
    assert "weight" not in params, sorted(params)
    assert layer.quantization_scheme.weights.num_bits == 4
    assert params["weight_packed"].dtype == torch.int32
    assert tuple(params["weight_packed"].shape) == (layer.out_features, layer.in_features // 8)
    assert tuple(params["weight_scale"].shape) == (layer.out_features, layer.in_features // group_size)
    assert ("weight_zero_point" in params) == (not symmetric)


@pytest.mark.slow
def test_gptq_and_awq_quantize_reload_generate_and_evaluate(prefect_api, quantize_env, tiny) -> None:
    import torch
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gauntlet.tasks.quantize import quantize

    model, data = tiny
    variants = [QuantizeVariant(method="gptq", group_size=32), QuantizeVariant(method="awq", group_size=64)]
    spec = EvalSpec(tasks=["demo_facts"], limit=16, batch_size=16,
                    speed_probe=SpeedProbeSpec(prompts=2, max_new_tokens=4))
    state = _quantize_and_evaluate(variants, model, data, spec)
    assert state.is_completed(), state.message
    results = state.result()
    assert [q.variant for q, _ in results] == ["gptq-w4g32", "awq-w4g64"]

    train_rows = [json.loads(line) for line in Path(data.train_path).read_text().splitlines()]
    train_texts = {format_prompt(r["instruction"], r["input"]) + r["output"] for r in train_rows}
    c = MlflowClient()
    for (q, report), group in zip(results, (32, 64), strict=True):
        # durable, self-describing folder; the calibration texts are rows of the run's training data
        out = Path(q.output_dir)
        assert Path(q.path) == out / "model" and (out / ".gauntlet-complete").exists()
        config = json.loads((Path(q.path) / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "compressed-tensors"
        assert config["config_groups"]["group_0"]["weights"]["group_size"] == group
        assert config["config_groups"]["group_0"]["weights"]["symmetric"] == (q.method == "gptq")
        calibration = (out / "calibration.jsonl").read_bytes()
        assert hashlib.md5(calibration).hexdigest() == q.calibration_md5
        texts = [json.loads(line)["text"] for line in calibration.decode().splitlines()]
        assert len(texts) == CALIBRATION.samples and set(texts) <= train_texts
        assert 0.2 < q.size_ratio < 0.5, q.size_ratio  # 4-bit linears; embeddings and lm_head stay float32
        assert q.sha == sha256_dir(Path(q.path)) and q.base_sha == model.sha

        # reload with transformers (main environment), 4-bit grouped weights, generate
        loaded = AutoModelForCausalLM.from_pretrained(q.path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(q.path)
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            assert_4bit_groups(loaded.model.layers[0].get_submodule(name), group, symmetric=q.method == "gptq")
        assert loaded.lm_head.weight.dtype == torch.float32  # ignored: stays full precision
        enc = tokenizer(format_prompt("Which colour does Kaloter like best?"), return_tensors="pt")
        generated = loaded.generate(**enc, do_sample=False, max_new_tokens=5, min_new_tokens=5,
                                    pad_token_id=tokenizer.pad_token_id)
        assert generated.shape[1] == enc["input_ids"].shape[1] + 5

        # evaluated through the normal evaluation task, like any model
        assert report.variant == q.variant and report.model_sha == q.sha
        acc = report.score("demo_facts", "acc")
        assert acc is not None and 0.0 <= acc <= 1.0
        assert report.perf is not None and report.perf.size_on_disk_gb == pytest.approx(q.size_bytes / 1e9)

        # the MLflow record of the quantize stage
        run = c.get_run(q.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.data.tags["gauntlet.stage"] == f"quantize-{q.variant}"
        assert run.data.params["method"] == q.method and run.data.params["bits"] == "4"
        assert run.data.params["group_size"] == str(group)
        assert run.data.params["calibration.md5"] == q.calibration_md5
        assert run.data.params["calibration.source_md5"] == data.file_md5["data/train.jsonl"]
        assert run.data.metrics["size_on_disk_mb"] == pytest.approx(q.size_bytes / 1e6)
        assert run.data.metrics["size_ratio"] == pytest.approx(q.size_ratio)
        assert run.data.metrics["duration_s"] > 0
        artifacts = {a.path for a in c.list_artifacts(q.mlflow_run_id)}
        assert {"quantization_config.json", "result.json", "quantizer.log", "recipe.yaml"} <= artifacts
        result = json.loads((out / "result.json").read_text())
        assert result["versions"]["llmcompressor"].startswith("0.14") and result["smoke_text"] is not None
    assert json.loads((Path(results[1][0].output_dir) / "result.json").read_text())["awq_cpu_guard"] is True

    # unchanged inputs: the same variants come from the cache, receipts intact
    again = _quantize_and_evaluate(variants, model, data, spec)
    assert again.is_completed()
    assert [q.sha for q, _ in again.result()] == [q.sha for q, _ in results]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[again.state_details.flow_run_id])))
    assert {r.name: r.state.name for r in runs if r.name.startswith("quantize-")} == {
        "quantize-gptq-w4g32": "Cached", "quantize-awq-w4g64": "Cached"}
    for q, _ in results:
        params = {"variant": QuantizeVariant(method=q.method, group_size=q.group_size), "calibration": CALIBRATION,
                  "model": model, "data": data}
        assert quantize.receipt_ok(**params)


def test_cache_key_follows_model_method_params_and_calibration_data(tiny) -> None:
    from gauntlet.tasks.quantize import quantize

    model, data = tiny
    gptq = QuantizeVariant(method="gptq", group_size=32)

    def key(variant=gptq, calibration=CALIBRATION, m=model, d=data) -> str:
        return quantize.key(variant=variant, calibration=calibration, model=m, data=d)

    other_train = data.model_copy(update={"file_md5": {**data.file_md5, "data/train.jsonl": "0" * 32}})
    other_eval = data.model_copy(update={"file_md5": {**data.file_md5, "data/eval.jsonl": "0" * 32}})
    assert key() == key(variant=QuantizeVariant(method="gptq", bits=4, group_size=32, name="gptq-w4g32"))
    assert key() != key(variant=QuantizeVariant(method="gptq", group_size=64))
    assert key() != key(variant=QuantizeVariant(method="awq", group_size=32))
    assert key() != key(m=model.model_copy(update={"sha": "other"}))
    assert key() != key(d=other_train)                      # calibration data changed
    assert key() == key(d=other_eval)                       # calibration reads the training file only
    assert key() != key(calibration=CALIBRATION.model_copy(update={"samples": CALIBRATION.samples + 1}))
    nf4 = QuantizeVariant(method="bnb-nf4")                 # calibration-free: the data does not matter
    assert key(variant=nf4) == key(variant=nf4, d=other_train, calibration=CALIBRATION.model_copy(update={"seed": 9}))


def test_bitsandbytes_variants_are_saved_prequantized_and_reload_exactly(tiny, tmp_path: Path) -> None:
    """NF4 and INT8 folders reload to the same logits as quantizing at load time (the NF4 folder is saved
    before bitsandbytes' first CPU forward repacks its weights), and they are about 2x-2.5x smaller."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from gauntlet.quantization import quantize_model

    model, data = tiny
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    enc = tokenizer(format_prompt("Name a colour."), return_tensors="pt")
    configs = {"bnb-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float32),
               "bnb-int8": BitsAndBytesConfig(load_in_8bit=True)}
    for method, config in configs.items():
        q = quantize_model(QuantizeVariant(method=method), CALIBRATION, model, data, tmp_path / method)
        assert q.variant == method and q.calibration_md5 is None and q.group_size is None
        assert q.bits == (4 if method == "bnb-nf4" else 8)
        assert 0.3 < q.size_ratio < 0.55, q.size_ratio
        saved = AutoModelForCausalLM.from_pretrained(q.path, device_map="cpu", dtype=torch.float32)
        fresh = AutoModelForCausalLM.from_pretrained(model.path, quantization_config=config, device_map="cpu",
                                                     dtype=torch.float32)
        with torch.inference_mode():
            assert torch.equal(saved(**enc).logits, fresh(**enc).logits), method
        assert json.loads((Path(q.path) / "config.json").read_text())["quantization_config"]["quant_method"] \
            == "bitsandbytes"


def test_group_size_that_does_not_divide_the_model_fails_before_any_work(tiny, tmp_path: Path) -> None:
    from gauntlet.quantization import QuantizeInputError, quantize_model

    model, data = tiny
    with pytest.raises(QuantizeInputError) as err:
        quantize_model(QuantizeVariant(method="gptq", group_size=256), CALIBRATION, model, data, tmp_path / "q")
    message = str(err.value)
    assert "gptq-w4g256" in message and "hidden_size=128" in message and "[32, 64, 128]" in message
    assert not (tmp_path / "q" / "model").exists() and not (tmp_path / "q" / "calibration.jsonl").exists()


def test_calibration_set_smaller_than_asked_fails_in_the_task(tiny, tmp_path: Path) -> None:
    from gauntlet.quantization import QuantizeInputError, quantize_model

    model, data = tiny
    rows = data.rows["train"]
    with pytest.raises(QuantizeInputError, match=f"has {rows} rows; set quantize.calibration.samples to at most {rows}"):
        quantize_model(QuantizeVariant(method="awq"), CalibrationSpec(samples=rows + 1), model, data, tmp_path / "q")
    assert not (tmp_path / "q" / "model").exists()
