"""The training program: QLoRA / LoRA / full fine-tuning of a causal LM on alpaca-style JSONL.

A plain program with no Prefect inside, readable top to bottom, launched by ``tasks/train.py`` as
``accelerate launch [...] -m tasks.trainer --args ARGS.json``; it can be run by hand the same way.
It writes ``result.json`` into the output folder, which the Prefect task reads back.

    ARGS.json = {"base_model": DIR, "train_path": JSONL, "validation_path": JSONL, "output_dir": DIR,
                 "train": {TrainSpec fields}, "mlflow": {"tracking_uri": ..., "run_id": ...} | null}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from tasks.prompting import format_prompt

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# data: prompt tokens are masked so the loss is on the response only
# ---------------------------------------------------------------------------------------------


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def tokenize_example(row: dict, tokenizer, max_len: int) -> dict:
    prompt_ids = tokenizer(format_prompt(row["instruction"], row.get("input", "")), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + answer_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_len]
    return {"input_ids": input_ids, "labels": labels}


def collate(batch: list[dict], pad_id: int) -> dict:
    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------------------------------------
# model: 4-bit NF4 base + LoRA (qlora), 16-bit base + LoRA (lora), or all weights (full)
# ---------------------------------------------------------------------------------------------


def load_model(base_model: str, train: dict, accelerator: Accelerator):
    from transformers import AutoModelForCausalLM

    on_gpu = accelerator.device.type == "cuda"
    compute_dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    kwargs: dict = {"dtype": compute_dtype}
    if train["method"] == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype)
        # bitsandbytes places the weights itself: one full copy per process, on that process's device.
        kwargs["device_map"] = {"": accelerator.local_process_index} if on_gpu else "cpu"
    model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    if train["method"] == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if train["method"] == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=on_gpu)
    lora = train["lora"]
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def merge_and_save(base_model: str, adapter_dir: Path, merged_dir: Path, tokenizer) -> None:
    """Merge the adapter into a full-precision copy of the base (4-bit weights cannot be merged exactly)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)


# ---------------------------------------------------------------------------------------------
# metrics: MLflow while training (main process only) and progress lines on stdout
# ---------------------------------------------------------------------------------------------


class MetricsSink:
    def __init__(self, mlflow_args: dict | None, enabled: bool):
        self.client = None
        self.run_id = None
        if enabled and mlflow_args:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=mlflow_args["tracking_uri"])
            self.run_id = mlflow_args["run_id"]
        self.history: list[dict] = []

    def log(self, step: int, metrics: dict) -> None:
        self.history.append({"step": step, **metrics})
        if self.client:
            ts = int(time.time() * 1000)
            from mlflow.entities import Metric

            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


@torch.no_grad()
def validation_loss(model, loader, accelerator: Accelerator) -> float:
    model.eval()
    losses = []
    for batch in loader:
        losses.append(accelerator.gather(model(**batch).loss.detach().reshape(1)).mean().item())
    model.train()
    return float(sum(losses) / max(len(losses), 1))


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "train_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["train_loss"] for h in history if "train_loss" in h], label="train loss")
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------


def train(args: dict) -> dict:
    cfg = args["train"]
    out = Path(args["output_dir"])
    accelerator = Accelerator(gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
                              cpu=args.get("cpu", False))
    set_seed(cfg["seed"])
    main = accelerator.is_main_process
    say = accelerator.print
    sink = MetricsSink(args.get("mlflow"), enabled=main)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args["base_model"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows = [tokenize_example(r, tokenizer, cfg["max_seq_len"]) for r in read_jsonl(args["train_path"])]
    val_rows = [tokenize_example(r, tokenizer, cfg["max_seq_len"]) for r in read_jsonl(args["validation_path"])]

    def loader(rows, shuffle):
        return DataLoader(rows, batch_size=cfg["batch_size"], shuffle=shuffle,
                          collate_fn=lambda b: collate(b, tokenizer.pad_token_id),
                          generator=torch.Generator().manual_seed(cfg["seed"]))

    model = load_model(args["base_model"], cfg, accelerator)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"[trainer] method={cfg['method']} trainable={trainable:,}/{total:,} rows={len(train_rows)} "
        f"device={accelerator.device} processes={accelerator.num_processes}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, cfg["warmup_steps"], cfg["max_steps"])
    train_loader, val_loader = loader(train_rows, True), loader(val_rows, False)
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler)

    step, tokens, started, window_start = 0, 0, time.time(), time.time()
    running = []
    model.train()
    while step < cfg["max_steps"]:
        for batch in train_loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                grad_norm = (accelerator.clip_grad_norm_(model.parameters(), 1.0)
                             if accelerator.sync_gradients else None)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            running.append(loss.item())
            if not accelerator.sync_gradients:
                continue
            step += 1
            if step % cfg["logging_steps"] == 0 or step == cfg["max_steps"]:
                elapsed = time.time() - window_start
                metrics = {"train_loss": sum(running) / len(running), "learning_rate": scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                           "tokens_per_s": tokens / max(elapsed, 1e-9),
                           "peak_memory_gb": peak_memory_gb(accelerator.device)}
                if step == cfg["max_steps"]:
                    metrics["val_loss"] = validation_loss(model, val_loader, accelerator)
                sink.log(step, metrics)
                say(f"[trainer] step {step}/{cfg['max_steps']} " +
                    " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                running, tokens, window_start = [], 0, time.time()
            if step >= cfg["max_steps"]:
                break

    accelerator.wait_for_everyone()
    result: dict = {"steps": step, "duration_s": time.time() - started}
    if main:
        unwrapped = accelerator.unwrap_model(model)
        merged_dir = out / "merged"
        if cfg["method"] == "full":
            unwrapped.save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
        else:
            adapter_dir = out / "adapter"
            unwrapped.save_pretrained(adapter_dir)
            tokenizer.save_pretrained(adapter_dir)
            merge_and_save(args["base_model"], adapter_dir, merged_dir, tokenizer)
            result["adapter_path"] = str(adapter_dir)
        plot_loss(sink.history, out / "loss_curve.png")
        last = sink.history[-1]
        result.update(merged_path=str(merged_dir), loss_curve=str(out / "loss_curve.png"),
                      metrics={"train_loss": last["train_loss"], "val_loss": last.get("val_loss", math.nan),
                               "train_duration_s": result["duration_s"]},
                      history=sink.history)
        (out / "result.json").write_text(json.dumps(result, indent=2))
        say(f"[trainer] done: {step} steps in {result['duration_s']:.1f}s; merged model at {merged_dir}")
    accelerator.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune a causal LM (QLoRA/LoRA/full) from a Gauntlet args file.")
    parser.add_argument("--args", required=True, help="JSON file written by tasks/train.py")
    ns = parser.parse_args(argv)
    args = json.loads(Path(ns.args).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(args)


if __name__ == "__main__":
    main()
