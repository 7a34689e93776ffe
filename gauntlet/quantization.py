"""Quantization: GPTQ / AWQ variants calibrated on the run's data, and bitsandbytes NF4 / INT8.

* **GPTQ and AWQ** come from llm-compressor (the maintained successor of auto-gptq and AutoAWQ, which are
  archived). It writes the compressed-tensors format that transformers and vLLM load. It pins
  transformers and compressed-tensors to versions the main environment cannot share, so it runs in an
  environment of its own (:mod:`gauntlet.envs`: a venv made on first use) as the plain program
  ``gauntlet/programs/quantizer.py``, launched like the trainer (:mod:`gauntlet.launch`). The calibration texts are rows of the
  run's DVC training file (``DatasetRef.train_path``), drawn with a seed, formatted with the training
  prompt; their md5 is recorded.
* **bitsandbytes NF4 / INT8** need no calibration: quantized in this process at load time and saved as
  a pre-quantized folder (transformers serializes both on the CPU). The folder is saved before any
  forward pass: bitsandbytes 0.50 repacks 4-bit weights in place at the first CPU forward, and a folder
  saved after that reloads with wrong weights.

Every variant is reloaded from disk with transformers in this (the main) environment and generates a few
tokens before it is returned, as a :class:`~gauntlet.refs.QuantizedModel` (a ModelRef), so it flows into the
evaluation stage like any model. No Prefect here: ``tasks/quantize.py`` is the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from gauntlet.config.quantize import CalibrationSpec, QuantizeVariant
from gauntlet.envs import QUANTIZE_ENV
from gauntlet.files import mark_complete, size_on_disk, write_json, write_text
from gauntlet.hashing import sha256_dir
from gauntlet.launch import ProgramTimeout, launch, write_args
from gauntlet.programs import quantizer
from gauntlet.prompting import format_prompt
from gauntlet.refs import DatasetRef, ModelRef, QuantizedModel

log = logging.getLogger(__name__)
SMOKE_PROMPT = format_prompt("Name a colour.")
SMOKE_TOKENS = 8


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
    assert data.train_path is not None   # without a train file a calibrated variant is skipped (variant_skip_reason)
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
    assert data.train_path is not None   # without a train file a calibrated variant is skipped (variant_skip_reason)
    train = Path(data.train_path).as_posix()
    return next((md5 for rel, md5 in data.file_md5.items() if train.endswith("/" + rel.lstrip("/"))), data.md5)


# ---------------------------------------------------------------------------------------------
# the methods
# ---------------------------------------------------------------------------------------------


def run_quantizer(variant: QuantizeVariant, model: ModelRef, calibration_file: Path, max_seq_len: int,
                  out: Path, echo: Callable[[str], None] = print) -> dict:
    """GPTQ/AWQ: run the quantizer program with the quantize environment's Python; returns its result.json."""
    python = QUANTIZE_ENV.ensure(echo)
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)  # never mix files of an earlier, failed attempt
    args_file = write_args(out / "quantize_args.json", {
        "model_path": model.path, "output_dir": str(model_dir), "method": variant.method, "bits": variant.bits,
        "group_size": variant.group_size, "calibration_path": str(calibration_file), "max_seq_len": max_seq_len,
        "result_path": str(out / "result.json")})
    # -I: the venv's own packages only (no PYTHONPATH, no script folder on sys.path); -u: stream output.
    cmd = [str(python), "-I", "-u", quantizer.__file__, "--args", str(args_file)]
    echo("running: " + " ".join(cmd))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    try:
        finished = launch(cmd, cwd=out, env=env, result_file=out / "result.json", log_file=out / "quantizer.log",
                          echo=echo, show=lambda line: line.startswith("[quantizer]") or "Error" in line,
                          tail_lines=30, timeout_s=variant.timeout_minutes * 60 if variant.timeout_minutes else None)
    except ProgramTimeout as e:
        raise QuantizeError(f"quantize stage ({variant.name}): stopped after timeout_minutes="
                            f"{variant.timeout_minutes:g} (the quantizer's process group was killed): {e}") from None
    if finished.code == quantizer.EXIT_INVALID:
        raise QuantizeInputError(f"quantize variant {variant.name}: " + finished.last_lines())
    if not finished.ok:
        raise QuantizeError(f"quantizer {finished.how} for {variant.name} (log: {out / 'quantizer.log'}); "
                            "last lines:\n" + finished.last_lines())
    assert finished.result is not None
    return finished.result


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
    write_json(out / "result.json", result)
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
        write_text(calibration_file, "".join(json.dumps({"text": t}) + "\n" for t in texts))
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
    write_json(out / "quantization_config.json", result["quantization_config"])
    write_json(out / "result.json", result)
    mark_complete(out)
    return QuantizedModel(
        name=f"{model.name}-{variant.name}", path=str(model_dir), source=f"quantized-from:{model.source}",
        revision=model.sha[:12], sha=sha256_dir(model_dir), variant=variant.name, method=variant.method,
        bits=variant.bits, group_size=variant.group_size, base_sha=model.sha, size_bytes=size_on_disk(model_dir),
        base_size_bytes=size_on_disk(Path(model.path)), calibration_md5=calibration_md5, duration_s=duration,
        output_dir=str(out))
