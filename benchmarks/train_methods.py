"""Training throughput of the three methods on the demo model and data, same steps, same machine; and DPO against
TRL's own command.

    python benchmarks/train_methods.py [--steps 60] [--dpo-only]

Runs `gauntlet.programs.trainer` under `accelerate launch` for qlora, lora and full fine-tuning and prints
tokens/s, wall time, final train loss and peak memory; ratios are against lora (the baseline).

DPO: `gauntlet.programs.preference_trainer` (what the train stage launches) against `trl dpo` on the same settings
(LoRA on all linear layers, fp32 on the CPU, the demo's preference pairs, the same steps, batch, length and beta),
in one run. Two ratios, ours / TRL's: the Trainer's own `train_runtime` (the loop, where Gauntlet's callback adds the
step log, the metrics and the checkpoint renames), and the whole process's wall time (ours also measures the
held-out preference accuracy before and after, evaluates and merges the adapter).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gauntlet.config.train import AccelerateSpec, TrainSpec  # noqa: E402
from gauntlet.demo import data as demo_data  # noqa: E402
from gauntlet.demo.model import build_demo_model  # noqa: E402
from gauntlet.training import launch_command, program_for  # noqa: E402


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


DPO = dict(objective="dpo", method="lora", learning_rate=3e-3, batch_size=16, max_seq_len=64,
           lora={"r": 16, "alpha": 32, "dropout": 0.0}, checkpoint_steps=None)


def run_dpo(steps: int, work: Path, model: Path, data: Path) -> dict:
    out = work / "dpo-gauntlet"
    out.mkdir(parents=True)
    spec = TrainSpec(**DPO, max_steps=steps, logging_steps=max(1, steps // 6))
    args = {"base_model": str(model), "train_path": str(data / "train.jsonl"),
            "validation_path": str(data / "validation.jsonl"), "output_dir": str(out), "cpu": True,
            "train": spec.model_dump(mode="json"), "mlflow": None}
    (out / "args.json").write_text(json.dumps(args))
    cmd = launch_command(AccelerateSpec(cpu=True), out / "args.json", True, program_for(spec))
    started = time.time()
    subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
    result = json.loads((out / "result.json").read_text())
    return {"loop_s": result["train_runtime_s"], "wall_s": time.time() - started,
            "loss": result["metrics"]["train_loss"]}


def run_trl_dpo(steps: int, work: Path, model: Path, data: Path) -> dict:
    """TRL's own `trl dpo` command, same settings; the arguments it does not know go to its `accelerate launch`,
    given the same options as the stage's launch."""
    out = work / "dpo-trl"
    spec = TrainSpec(**DPO, max_steps=steps)
    launch_options = launch_command(AccelerateSpec(cpu=True), out / "unused.json", True)[3:-4]   # the options only
    cmd = [str(Path(sys.executable).with_name("trl")), "dpo", "--model_name_or_path", str(model), "--dataset_name", str(data),
                      "--output_dir", str(out), "--max_steps", str(steps), "--per_device_train_batch_size",
                      str(spec.batch_size), "--learning_rate", str(spec.learning_rate), "--lr_scheduler_type",
                      "linear", "--max_length", str(spec.max_seq_len), "--beta", str(spec.preference_settings().beta), "--use_peft",
                      "--lora_r", "16", "--lora_alpha", "32", "--lora_dropout", "0.0", "--lora_target_modules",
                      "all-linear", "--use_cpu", "--dtype", "float32", "--report_to", "none", "--save_strategy",
                      "no", "--logging_steps", str(max(1, steps // 6)), "--seed", "0",
                      # TRL's configs default to both; the stage turns them off on the CPU
                      "--gradient_checkpointing", "False", "--bf16", "False", *launch_options]
    started = time.time()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    wall = time.time() - started
    if done.returncode:
        raise SystemExit(f"trl dpo failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    logged = [ast.literal_eval(line[line.index("{"):line.rindex("}") + 1])
              for line in (done.stdout + done.stderr).splitlines() if line.startswith("{'")]
    summary = next(m for m in logged if "train_runtime" in m)
    last = [m for m in logged if "loss" in m][-1]   # the last logging window's, as ours reports it
    return {"loop_s": float(summary["train_runtime"]), "wall_s": wall, "loss": float(last["loss"])}


def dpo_versus_trl(steps: int, work: Path, model: Path, repeats: int = 2) -> None:
    """Alternating runs (ours, TRL's, ours, ...), the fastest of each kept: on a shared machine a burst of load
    elsewhere then slows one run of each, not one side."""
    data = work / "pairs"
    for split, rows in demo_data.build_preference(48, 7).items():
        if split != "eval":
            demo_data.write_jsonl(data / f"{split}.jsonl", rows)
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    for i in range(repeats):
        runs["ours"].append(run_dpo(steps, work / f"r{i}", model, data))
        runs["trl"].append(run_trl_dpo(steps, work / f"r{i}", model, data))
    ours, theirs = (min(runs[k], key=lambda r: r["loop_s"]) for k in ("ours", "trl"))
    print(f"\nDPO, {steps} steps (LoRA, CPU), fastest of {repeats}   {'loop s':>8}{'per step s':>11}{'wall s':>8}"
          f"{'loss':>8}")
    for name, r in (("gauntlet preference_trainer", ours), ("trl dpo", theirs)):
        print(f"{name:<30}{r['loop_s']:>8.1f}{r['loop_s'] / steps:>11.3f}{r['wall_s']:>8.1f}{r['loss']:>8.3f}")
    print("every run's loop s: " + "; ".join(f"{k} " + ", ".join(f"{r['loop_s']:.1f}" for r in v)
                                             for k, v in runs.items()))
    print(f"ratio (ours / trl dpo): loop {ours['loop_s'] / theirs['loop_s']:.3f}x per step, "
          f"wall {ours['wall_s'] / theirs['wall_s']:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--dpo-only", action="store_true", help="only DPO against `trl dpo`")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gauntlet-bench-") as tmp:
        work = Path(tmp)
        os.environ["GAUNTLET_HOME"] = str(work / "home")
        model = build_demo_model("tiny-llama", out=work / "model")
        if args.dpo_only:
            dpo_versus_trl(args.steps, work, model)
            return
        for split, rows in demo_data.build(48, 7).items():
            demo_data.write_jsonl(work / "data" / f"{split}.jsonl", rows)
        results = {m: run(m, args.steps, work, model, work / "data") for m in ("lora", "qlora", "full")}
        dpo_versus_trl(args.steps, work, model)
    base = results["lora"]["tokens_per_s"]
    print(f"{'method':<8}{'tokens/s':>10}{'ratio':>7}{'train s':>9}{'loss':>8}{'peak GB':>9}")
    for m, r in results.items():
        print(f"{m:<8}{r['tokens_per_s']:>10.0f}{r['tokens_per_s'] / base:>7.2f}{r['seconds']:>9.1f}"
              f"{r['loss']:>8.3f}{r['peak_gb']:>9.3f}")


if __name__ == "__main__":
    main()
