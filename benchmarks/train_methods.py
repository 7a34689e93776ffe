"""Training throughput of the three methods on the demo model and data, same steps, same machine.

    python benchmarks/train_methods.py [--steps 60]

Runs `gauntlet.programs.trainer` under `accelerate launch` for qlora, lora and full fine-tuning and prints
tokens/s, wall time, final train loss and peak memory; ratios are against lora (the baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gauntlet.config.train import AccelerateSpec, TrainSpec  # noqa: E402
from gauntlet.demo import data as demo_data  # noqa: E402
from gauntlet.demo.model import build_demo_model  # noqa: E402
from gauntlet.training import launch_command  # noqa: E402


def run(method: str, steps: int, work: Path, model: Path, data: Path) -> dict:
    out = work / method
    out.mkdir()
    spec = TrainSpec(method=method, max_steps=steps, learning_rate=3e-3, batch_size=16, max_seq_len=64,
                     logging_steps=max(1, steps // 6))
    args = {"base_model": str(model), "train_path": str(data / "train.jsonl"),
            "validation_path": str(data / "validation.jsonl"), "output_dir": str(out), "cpu": True,
            "train": spec.model_dump(mode="json"), "mlflow": None}
    (out / "args.json").write_text(json.dumps(args))
    cmd = launch_command(AccelerateSpec(cpu=True), out / "args.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
    result = json.loads((out / "result.json").read_text())
    hist = [h for h in result["history"] if "tokens_per_s" in h]
    return {"tokens_per_s": sum(h["tokens_per_s"] for h in hist) / len(hist),
            "seconds": result["duration_s"], "loss": result["metrics"]["train_loss"],
            "peak_gb": max(h["peak_memory_gb"] for h in hist)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gauntlet-bench-") as tmp:
        work = Path(tmp)
        os.environ["GAUNTLET_HOME"] = str(work / "home")
        model = build_demo_model("tiny-llama", out=work / "model")
        for split, rows in demo_data.build(48, 7).items():
            demo_data.write_jsonl(work / "data" / f"{split}.jsonl", rows)
        results = {m: run(m, args.steps, work, model, work / "data") for m in ("lora", "qlora", "full")}
    base = results["lora"]["tokens_per_s"]
    print(f"{'method':<8}{'tokens/s':>10}{'ratio':>7}{'train s':>9}{'loss':>8}{'peak GB':>9}")
    for m, r in results.items():
        print(f"{m:<8}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / base:>7.2f}{r['seconds']:>9.1f}"
              f"{r['loss']:>8.3f}{r['peak_gb']:>9.3f}")


if __name__ == "__main__":
    main()
