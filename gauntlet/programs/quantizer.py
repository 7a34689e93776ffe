"""The quantization program: GPTQ or AWQ (4-bit weights, grouped scales) with llm-compressor.

A plain program with no Prefect and no Gauntlet import, run by ``gauntlet/quantization.py`` with the Python of
the quantize environment (``gauntlet/envs.py``; llm-compressor cannot share the main environment):

    <quantize-venv>/bin/python -I -u gauntlet/programs/quantizer.py --args ARGS.json

    ARGS.json = {"model_path": DIR, "output_dir": DIR, "method": "gptq" | "awq", "bits": 4,
                 "group_size": 128, "calibration_path": JSONL of {"text": ...}, "max_seq_len": 512}

It writes the variant (compressed-tensors format, which transformers and vLLM load) to ``output_dir``
and ``result.json`` beside it. Exit codes: 0 ok, 2 bad input (e.g. a group size that does not divide a
layer's input size), 1 anything else. It can be run by hand the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

EXIT_INVALID = 2


def say(message: str) -> None:
    print(f"[quantizer] {message}", flush=True)


def read_texts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def weight_scheme(method: str, bits: int, group_size: int) -> dict:
    """compressed-tensors weight-only integer scheme: GPTQ symmetric (W4A16 / W8A16), AWQ asymmetric
    (W4A16_ASYM, zero points carry the activation-aware shift), both with grouped scales."""
    return {"num_bits": bits, "type": "int", "strategy": "group", "group_size": group_size,
            "symmetric": method == "gptq", "dynamic": False}


def linear_input_sizes(model) -> dict[str, int]:
    import torch

    return {name: m.in_features for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.split(".")[-1] != "lm_head"}


def allow_cpu_only_awq() -> bool:
    """llm-compressor 0.14's AWQ pins cached activations (``IntermediatesCache.pin_memory``) to speed up
    host-to-device copies; ``pin_memory()`` raises on a machine with no accelerator. Pinning only makes
    those copies faster, so without an accelerator it is skipped. Returns True when the guard applied."""
    import torch

    if torch.accelerator.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not hasattr(IntermediatesCache, "pin_memory"):  # a later release without it: nothing to guard
        return False
    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    return True


def recipe_for(method: str, bits: int, group_size: int) -> list:
    groups = {"group_0": {"targets": ["Linear"], "weights": weight_scheme(method, bits, group_size)}}
    if method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]


def quantize(args: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method, bits, group_size = args["method"], int(args["bits"]), int(args["group_size"])
    if method not in ("gptq", "awq"):
        raise ValueError(f"method {method!r}: this program makes gptq and awq variants")
    out = Path(args["output_dir"])
    texts = read_texts(args["calibration_path"])
    tokenizer = AutoTokenizer.from_pretrained(args["model_path"])
    model = AutoModelForCausalLM.from_pretrained(args["model_path"], dtype="auto")
    bad = {n: size for n, size in linear_input_sizes(model).items() if size % group_size}
    if bad:
        sizes = sorted(set(bad.values()))
        print(f"group_size {group_size} does not divide the input size of {len(bad)} layer(s) "
              f"(sizes {sizes}, e.g. {next(iter(bad))}); use a power of two that divides {sizes}", file=sys.stderr)
        sys.exit(EXIT_INVALID)

    encoded = [tokenizer(t, max_length=args["max_seq_len"], truncation=True) for t in texts]
    calibration = Dataset.from_list([{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]}
                                     for e in encoded])
    tokens = sum(len(e["input_ids"]) for e in encoded)
    guarded = method == "awq" and allow_cpu_only_awq()
    say(f"{method} w{bits} g{group_size} on {args['model_path']}: {len(texts)} calibration samples, {tokens} tokens"
        + ("; no accelerator: AWQ's memory pinning skipped" if guarded else ""))

    from llmcompressor import oneshot

    started = time.time()
    oneshot(model=model, dataset=calibration, recipe=recipe_for(method, bits, group_size),
            num_calibration_samples=len(calibration), max_seq_length=args["max_seq_len"],
            shuffle_calibration_samples=False)
    duration = time.time() - started
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    quant_config = json.loads((out / "config.json").read_text()).get("quantization_config")
    if not quant_config:
        raise RuntimeError(f"{out}/config.json has no quantization_config after saving")
    result = {"method": method, "bits": bits, "group_size": group_size, "model_path": str(out),
              "calibration_samples": len(texts), "calibration_tokens": tokens, "duration_s": duration,
              "awq_cpu_guard": guarded, "device": "accelerator" if torch.accelerator.is_available() else "cpu",
              "quantization_config": quant_config,
              "versions": {p: version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}}
    say(f"done in {duration:.1f}s: {out}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Quantize a causal LM with GPTQ or AWQ (llm-compressor).")
    parser.add_argument("--args", required=True, help="JSON file written by gauntlet/quantization.py")
    ns = parser.parse_args(argv)
    args = json.loads(Path(ns.args).read_text())
    result = quantize(args)
    Path(args["result_path"]).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
