"""Size on disk, load time and decode speed of quantized variants against the unquantized model.

    python benchmarks/quantize_variants.py [--size tiny|small|1b] [--methods gptq,awq,bnb-nf4,bnb-int8]

Builds a randomly initialised Llama (``tiny`` is the demo model; ``1b`` is ~1.1B parameters, for a GPU
machine), quantizes it through ``tasks.quantize.quantize_model`` (GPTQ/AWQ in the quantize venv,
calibrated on the demo's training rows), then for each model measures: size on disk, ``from_pretrained``
load time, and the evaluation's own speed probe (``tasks.evaluate.probe_speed``: greedy decode tokens/s
at batch 1, time to first token). Ratios are against the unquantized model (the baseline). Random
weights: speed and size only, no accuracy.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gauntlet.demo import data as demo_data  # noqa: E402
from gauntlet.demo.model import DEMO_CONFIG, build_demo_model  # noqa: E402

SIZES = {
    "tiny": {},
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048),
}


def build_model(size: str, out: Path) -> Path:
    """The demo model, or a wider random Llama with the demo tokenizer (ids < 512 are all it emits)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    demo = build_demo_model("tiny-llama", out=out / "tiny")
    if size == "tiny":
        return demo
    tokenizer = AutoTokenizer.from_pretrained(demo)
    dims = {**DEMO_CONFIG, "initializer_range": 0.02, **SIZES[size]}
    dims.setdefault("vocab_size", len(tokenizer))
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **dims)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = LlamaForCausalLM(config).to(dtype)
    path = out / size
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print(f"built {size}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters ({dtype})")
    return path


def measure(path: str, probe) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from gauntlet.eval.speed import probe_speed

    cuda = torch.cuda.is_available()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto" if cuda else torch.float32,
                                                 device_map="cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - started
    del model
    perf = probe_speed(path, probe)
    return {"size_mb": perf.size_on_disk_gb * 1e3, "load_s": load_s, "tokens_per_s": perf.tokens_per_s,
            "ttft_ms": perf.first_token_latency_ms, "peak_gb": perf.peak_memory_gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--methods", default="gptq,awq,bnb-nf4,bnb-int8")
    parser.add_argument("--samples", type=int, default=32, help="calibration samples for gptq/awq")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gauntlet-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("GAUNTLET_HOME", str(work / "home"))
        from gauntlet.config.eval import SpeedProbeSpec
        from gauntlet.config.quantize import CalibrationSpec, QuantizeVariant
        from gauntlet.hashing import sha256_dir
        from gauntlet.quantization import quantize_model
        from gauntlet.refs import DatasetRef, ModelRef

        path = build_model(args.size, work)
        train = work / "train.jsonl"
        demo_data.write_jsonl(train, demo_data.build(48, 7)["train"])
        data = DatasetRef(repo=str(work), train_path=str(train), validation_path=str(train), md5="bench",
                          file_md5={}, rows={})
        model = ModelRef(name=args.size, path=str(path), source="benchmark", sha=sha256_dir(path))
        probe = SpeedProbeSpec(prompts=4, max_new_tokens=32)
        group = 64 if args.size == "tiny" else 128
        rows = {"unquantized": {**measure(str(path), probe), "quantize_s": 0.0}}
        for method in args.methods.split(","):
            variant = QuantizeVariant(method=method, group_size=group if method in ("gptq", "awq") else None)
            q = quantize_model(variant, CalibrationSpec(samples=args.samples, max_seq_len=128), model, data,
                               work / "variants" / variant.name, echo=lambda _: None)
            rows[variant.name] = {**measure(q.path, probe), "quantize_s": q.duration_s}
    base = rows["unquantized"]
    print(f"\n{args.size} model; ratios against unquantized")
    print(f"{'variant':<13}{'size MB':>9}{'ratio':>7}{'load s':>8}{'tok/s':>8}{'ratio':>7}{'TTFT ms':>9}"
          f"{'quantize s':>11}")
    for name, r in rows.items():
        print(f"{name:<13}{r['size_mb']:>9.2f}{r['size_mb'] / base['size_mb']:>7.2f}{r['load_s']:>8.2f}"
              f"{r['tokens_per_s']:>8.1f}{r['tokens_per_s'] / base['tokens_per_s']:>7.2f}{r['ttft_ms']:>9.1f}"
              f"{r['quantize_s']:>11.1f}")


if __name__ == "__main__":
    main()
