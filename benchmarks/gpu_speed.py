"""The speed probe and one fixture suite on a GPU, beside the batch-1 decode roofline.

Builds a randomly initialised Llama-architecture model of ~1.1B parameters (TinyLlama's shape) on the
machine, saves it in bf16, then through the evaluation stage's own code (hf backend):
  - measures the device's memory bandwidth (a large device-to-device copy),
  - runs the speed probe: tokens/s at batch 1 and at batch 64, TTFT p50/p95, peak memory,
  - evaluates one suite's fixtures (default en-core) and times it,
and prints a markdown table for benchmarks/RESULTS.md. Roofline for batch-1 decode: every generated
token reads all weights once, so tokens/s <= bandwidth / weight bytes.

    python -m benchmarks.gpu_speed [--suite en-core] [--out /tmp/gpu-bench]

Needs CUDA; torch, transformers and lm-eval only (no vllm).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, max_position_embeddings=2048, vocab_size=32000, tie_word_embeddings=False)


def memory_bandwidth_gbs(size_gb: float = 2.0, repeats: int = 20) -> float:
    """Device memory bandwidth from a large copy (bytes read + bytes written per second), GB/s."""
    import torch

    n = int(size_gb * 1e9 / 2)
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return 2 * src.numel() * src.element_size() * repeats / seconds / 1e9


def build_model(out: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gauntlet.demo.model import build_demo_model

    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(build_demo_model("tiny-llama"))  # ids < 512 < vocab: fine for speed
    torch.manual_seed(0)
    config = LlamaConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **LLAMA_1B)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", default="en-core")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "gauntlet-gpu-bench"))
    parser.add_argument("--limit", type=int, default=None, help="items per task (default: all fixture rows)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures the GPU path")
    os.environ.setdefault("GAUNTLET_HOME", str(Path(args.out) / "home"))
    from benchmarks.library_eval import evaluate_without_stages
    from gauntlet.config.eval import EvalSpec, SpeedProbeSpec
    from gauntlet.eval.engine import engine_for
    from gauntlet.eval.speed import probe_speed
    from gauntlet.hashing import sha256_dir
    from gauntlet.refs import ModelRef

    path = build_model(Path(args.out) / "llama-1b-random")
    params = sum(p.numel() for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16).parameters())
    weight_bytes = params * 2
    bandwidth = memory_bandwidth_gbs()
    roofline = bandwidth * 1e9 / weight_bytes
    model = ModelRef(name="llama-1b-random", path=str(path), source=str(path), sha=sha256_dir(path))
    probe = SpeedProbeSpec(prompts=16, max_new_tokens=128, large_batch=64)
    spec = EvalSpec(suite=args.suite, fixtures=True, limit=args.limit, batch_size=64, speed_probe=probe)
    with engine_for(spec, model) as engine:
        perf = probe_speed(engine, probe)
    t0 = time.perf_counter()
    report = evaluate_without_stages(spec.model_copy(update={"speed_probe": SpeedProbeSpec(enabled=False)}), model,
                                     Path(args.out) / "report")
    suite_seconds = time.perf_counter() - t0

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {params / 1e9:.2f}B parameters (bf16, "
          f"{weight_bytes / 1e9:.2f} GB of weights), measured copy bandwidth {bandwidth:.0f} GB/s\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| output tokens/s, batch 1 | {perf.tokens_per_s:.1f} |")
    print(f"| roofline, batch-1 decode (bandwidth / weight bytes) | {roofline:.1f} |")
    print(f"| batch-1 share of the roofline | {perf.tokens_per_s / roofline:.0%} |")
    print(f"| output tokens/s, batch {perf.large_batch} | {perf.tokens_per_s_large_batch:.1f} |")
    print(f"| TTFT p50 / p95 (ms) | {perf.ttft_p50_ms:.1f} / {perf.ttft_p95_ms:.1f} |")
    print(f"| peak device memory (GB) | {perf.peak_memory_gb:.2f} |")
    print(f"| {args.suite} fixtures, wall time (s) | {suite_seconds:.1f} |")
    print(f"| {args.suite} average normalized score (random model: ~0) | {report.average_normalized:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
