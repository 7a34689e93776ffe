"""Stage 4, quantization: GPTQ / AWQ variants calibrated on the run's data, and bitsandbytes NF4 / INT8.

* **GPTQ and AWQ** come from llm-compressor (the maintained successor of auto-gptq and AutoAWQ, which are
  archived). It writes the compressed-tensors format that transformers and vLLM load. It pins
  transformers and compressed-tensors to versions the main environment cannot share, so it runs in an
  environment of its own (``tasks/envs.py``: a venv made on first use) as the plain program
  ``tasks/quantizer.py``, like training runs ``tasks/trainer.py``. The calibration texts are rows of the
  run's DVC training file (``DatasetRef.train_path``), drawn with a seed, formatted with the training
  prompt; their md5 is recorded.
* **bitsandbytes NF4 / INT8** need no calibration: quantized in this process at load time and saved as
  a pre-quantized folder (transformers serializes both on the CPU). The folder is saved before any
  forward pass: bitsandbytes 0.50 repacks 4-bit weights in place at the first CPU forward, and a folder
  saved after that reloads with wrong weights.

Every variant is reloaded from disk with transformers in this (the main) environment and generates a few
tokens before it is returned, as a :class:`~tasks.refs.QuantizedModel` (a ModelRef), so it flows into the
evaluation task like any model. No Prefect in the plain functions; the task wrapper is at the bottom.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from prefect import get_run_logger, task

from tasks.caching import Stage, retry_unless
from tasks.envs import QUANTIZE_ENV
from tasks.prompting import format_prompt
from tasks.refs import DatasetRef, ModelRef, QuantizedModel
from tasks.spec import CalibrationSpec, QuantizeVariant
from tasks.state import PROJECT_ROOT, mark_complete, sha256_dir, sha256_files
from tasks.tracking import RunContext, stage_run

log = logging.getLogger(__name__)
QUANTIZER = PROJECT_ROOT / "tasks" / "quantizer.py"
SMOKE_PROMPT = format_prompt("Name a colour.")
SMOKE_TOKENS = 8
EXIT_INVALID = 2  # tasks/quantizer.py: bad input


class QuantizeError(RuntimeError):
    """A quantization run that failed (the program crashed, the variant does not load or generate)."""


class QuantizeInputError(ValueError):
    """Input a retry cannot fix: a group size the model's layers do not allow, too little calibration data."""


# ---------------------------------------------------------------------------------------------
# checks before heavy work
# ---------------------------------------------------------------------------------------------


def linear_input_sizes(model_path: str) -> dict[str, int]:
    """Input sizes of the decoder's linear layers, from config.json (Llama-style names); {} if unknown."""
    config = json.loads((Path(model_path) / "config.json").read_text())
    config = config.get("text_config", config)
    sizes = {}
    if config.get("hidden_size"):
        sizes["hidden_size"] = config["hidden_size"]
    if config.get("intermediate_size"):
        sizes["intermediate_size"] = config["intermediate_size"]
    heads, head_dim = config.get("num_attention_heads"), config.get("head_dim")
    if heads and head_dim:
        sizes["num_attention_heads*head_dim"] = heads * head_dim
    return sizes


def check_group_size(variant: QuantizeVariant, model: ModelRef) -> None:
    if not variant.calibrated or variant.group_size is None:
        return
    sizes = linear_input_sizes(model.path)
    bad = {k: v for k, v in sizes.items() if v % variant.group_size}
    if bad:
        fits = [g for g in (32, 64, 128, 256) if all(v % g == 0 for v in sizes.values())]
        raise QuantizeInputError(
            f"quantize variant {variant.name}: group_size {variant.group_size} does not divide the model's "
            + ", ".join(f"{k}={v}" for k, v in bad.items())
            + f" ({model.name}); use a group_size that divides {sorted(set(sizes.values()))}"
            + (f", e.g. {fits}" if fits else ""))


def calibration_texts(data: DatasetRef, calibration: CalibrationSpec) -> list[str]:
    """``calibration.samples`` rows of the run's training file, drawn with the seed, as training prompts."""
    with open(data.train_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) < calibration.samples:
        raise QuantizeInputError(
            f"quantize.calibration.samples is {calibration.samples} but the training data {data.train_path} "
            f"has {len(rows)} rows; set quantize.calibration.samples to at most {len(rows)}")
    picked = sorted(random.Random(calibration.seed).sample(range(len(rows)), calibration.samples))
    return [format_prompt(rows[i]["instruction"], rows[i].get("input", "")) + rows[i]["output"] for i in picked]


def train_file_md5(data: DatasetRef) -> str:
    """DVC's md5 of the training file alone (calibration reads nothing else); the data version otherwise."""
    train = Path(data.train_path).as_posix()
    return next((md5 for rel, md5 in data.file_md5.items() if train.endswith("/" + rel.lstrip("/"))), data.md5)


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------


def run_quantizer(variant: QuantizeVariant, model: ModelRef, calibration_file: Path, max_seq_len: int,
                  out: Path, echo: Callable[[str], None] = print) -> dict:
    """GPTQ/AWQ: run tasks/quantizer.py with the quantize environment's Python; returns its result.json."""
    python = QUANTIZE_ENV.ensure(echo)
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)  # never mix files of an earlier, failed attempt
    args = {"model_path": model.path, "output_dir": str(model_dir), "method": variant.method, "bits": variant.bits,
            "group_size": variant.group_size, "calibration_path": str(calibration_file), "max_seq_len": max_seq_len,
            "result_path": str(out / "result.json")}
    args_file = out / "quantize_args.json"
    args_file.write_text(json.dumps(args, indent=2))
    (out / "result.json").unlink(missing_ok=True)
    # -I: the venv's own packages only (no PYTHONPATH, no script folder on sys.path); -u: stream output.
    cmd = [str(python), "-I", "-u", str(QUANTIZER), "--args", str(args_file)]
    echo("running: " + " ".join(cmd))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    tail: collections.deque[str] = collections.deque(maxlen=30)
    with open(out / "quantizer.log", "w") as full_log, subprocess.Popen(
            cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            full_log.write(line)
            line = line.rstrip()
            tail.append(line)
            if line.startswith("[quantizer]") or "Error" in line:
                echo(line)
        code = proc.wait()
    if code == EXIT_INVALID:
        raise QuantizeInputError(f"quantize variant {variant.name}: " + "\n".join(tail))
    if code != 0 or not (out / "result.json").exists():
        raise QuantizeError(f"quantizer exited with code {code} for {variant.name} (log: {out / 'quantizer.log'});"
                            " last lines:\n" + "\n".join(tail))
    return json.loads((out / "result.json").read_text())


def quantize_bitsandbytes(variant: QuantizeVariant, model: ModelRef, out: Path) -> dict:
    """NF4 or INT8 at load time, saved as a pre-quantized folder (before any forward pass, see module doc)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
              if variant.method == "bnb-nf4" else BitsAndBytesConfig(load_in_8bit=True))
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    started = time.time()
    quantized = AutoModelForCausalLM.from_pretrained(model.path, quantization_config=config, dtype=dtype,
                                                     device_map="cuda" if cuda else "cpu")
    quantized.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model.path).save_pretrained(model_dir)
    duration = time.time() - started
    del quantized
    from importlib.metadata import version

    result = {"method": variant.method, "bits": variant.bits, "group_size": None, "model_path": str(model_dir),
              "duration_s": duration, "device": "cuda" if cuda else "cpu",
              "quantization_config": json.loads((model_dir / "config.json").read_text())["quantization_config"],
              "versions": {p: version(p) for p in ("bitsandbytes", "transformers", "torch")}}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def smoke_test(model_path: Path) -> str:
    """Reload the variant with transformers (main environment), check it is quantized, generate; the text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        loaded = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto" if cuda else torch.float32,
                                                      device_map="cuda" if cuda else "cpu")
    except Exception as e:
        raise QuantizeError(f"variant {model_path} does not load with transformers: {type(e).__name__}: {e}") from e
    if getattr(loaded, "hf_quantizer", None) is None:
        raise QuantizeError(f"variant {model_path} loaded without its quantization (no quantization_config applied)")
    enc = tokenizer(SMOKE_PROMPT, return_tensors="pt").to(loaded.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        logits = loaded(**enc).logits
        out = loaded.generate(**enc, do_sample=False, max_new_tokens=SMOKE_TOKENS, min_new_tokens=SMOKE_TOKENS,
                              pad_token_id=pad)
    new = out.shape[1] - enc["input_ids"].shape[1]
    if not torch.isfinite(logits).all() or new != SMOKE_TOKENS:
        raise QuantizeError(f"variant {model_path} smoke test failed: finite logits "
                            f"{bool(torch.isfinite(logits).all())}, {new}/{SMOKE_TOKENS} tokens generated")
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def quantize_model(variant: QuantizeVariant, calibration: CalibrationSpec, model: ModelRef, data: DatasetRef,
                   out: Path, echo: Callable[[str], None] = print) -> QuantizedModel:
    """Make one variant of ``model`` in ``out`` (durable), smoke-test it, and return its ref."""
    out.mkdir(parents=True, exist_ok=True)
    check_group_size(variant, model)
    calibration_md5, env_setup_s = None, 0.0
    if variant.calibrated:
        texts = calibration_texts(data, calibration)
        calibration_file = out / "calibration.jsonl"
        calibration_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        calibration_md5 = hashlib.md5(calibration_file.read_bytes()).hexdigest()
        started = time.time()
        QUANTIZE_ENV.ensure(echo)  # minutes on first use; not part of the variant's time
        env_setup_s = time.time() - started
        started = time.time()
        result = run_quantizer(variant, model, calibration_file, calibration.max_seq_len, out, echo)
    else:
        started = time.time()
        result = quantize_bitsandbytes(variant, model, out)
    duration = time.time() - started
    model_dir = Path(result["model_path"])
    sample = smoke_test(model_dir)
    echo(f"{variant.name}: reloaded and generated {sample!r}")
    result.update(wall_s=duration, env_setup_s=env_setup_s, smoke_text=sample, calibration_md5=calibration_md5)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "quantization_config.json").write_text(json.dumps(result["quantization_config"], indent=2))
    mark_complete(out)
    return QuantizedModel(
        name=f"{model.name}-{variant.name}", path=str(model_dir), source=f"quantized-from:{model.source}",
        revision=model.sha[:12], sha=sha256_dir(model_dir), variant=variant.name, method=variant.method,
        bits=variant.bits, group_size=variant.group_size, base_sha=model.sha, size_bytes=dir_size(model_dir),
        base_size_bytes=dir_size(Path(model.path)), calibration_md5=calibration_md5, duration_s=duration,
        output_dir=str(out))


# ---------------------------------------------------------------------------------------------
# the Prefect task: keyed on (model content, method and its parameters, calibration data)
# ---------------------------------------------------------------------------------------------


def _key_parts(p: dict) -> list:
    variant, data = p["variant"], p["data"]
    calibration = None
    if variant.calibrated:  # calibration-free variants do not depend on the data or the quantize environment
        calibration = [p["calibration"].model_dump(mode="json"), train_file_md5(data),
                       sha256_files([QUANTIZE_ENV.requirements])]
    return [p["model"].sha, variant.model_dump(mode="json"), calibration]


QUANTIZE = Stage("quantize", modules=("quantize", "quantizer", "envs", "prompting"), key_parts=_key_parts)


@task(name="quantize", cache_key_fn=QUANTIZE.cache_key_fn, persist_result=True, task_run_name="quantize-{variant.name}",
      retries=1, retry_condition_fn=retry_unless(QuantizeInputError, QuantizeError))
def quantize_task(variant: QuantizeVariant, calibration: CalibrationSpec, model: ModelRef, data: DatasetRef,
                  run: RunContext) -> QuantizedModel:
    logger = get_run_logger()
    params = {"variant": variant, "calibration": calibration, "model": model, "data": data}
    out = QUANTIZE.output_dir(params)
    logged = {"variant": variant.name, "method": variant.method, "bits": variant.bits,
              "group_size": variant.group_size, "source_model.sha": model.sha}
    if variant.calibrated:
        logged.update({f"calibration.{k}": v for k, v in calibration.model_dump().items()})
        logged["calibration.source_md5"] = train_file_md5(data)
    with stage_run(run, f"quantize-{variant.name}", logged) as (c, rid):
        ref = quantize_model(variant, calibration, model, data, out, echo=logger.info)
        c.log_param(rid, "calibration.md5", str(ref.calibration_md5))
        c.log_metric(rid, "size_on_disk_mb", ref.size_bytes / 1e6)
        c.log_metric(rid, "base_size_on_disk_mb", ref.base_size_bytes / 1e6)
        c.log_metric(rid, "size_ratio", ref.size_ratio)
        c.log_metric(rid, "duration_s", ref.duration_s)
        for name in ("result.json", "quantization_config.json", "quantize_args.json", "quantizer.log"):
            if (out / name).exists():
                c.log_artifact(rid, str(out / name))
        if (Path(ref.path) / "recipe.yaml").exists():
            c.log_artifact(rid, str(Path(ref.path) / "recipe.yaml"))
        c.set_tag(rid, "gauntlet.variant_path", ref.path)
    logger.info(f"{variant.name}: {ref.size_bytes / 1e6:.2f} MB ({ref.size_ratio:.2f}x of {ref.base_size_bytes / 1e6:.2f} MB)"
                f" in {ref.duration_s:.1f}s at {ref.path}")
    QUANTIZE.write_receipt(params, [ref.path, str(out / "result.json")])
    return ref.model_copy(update={"mlflow_run_id": rid})
