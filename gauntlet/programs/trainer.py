"""The training program: QLoRA / LoRA / full fine-tuning of a causal LM on alpaca or chat JSONL.

A plain program with no Prefect inside, readable top to bottom (its parts, the chunked loss, checkpoints,
metrics and the model card, are in ``train_kit.py`` beside it), launched by ``gauntlet/training.py`` as
``accelerate launch [--config_file deployments/accelerate/<profile>.yaml] -m gauntlet.programs.trainer --args ARGS.json``;
it can be run by hand the same way.

    ARGS.json = {"base_model": DIR, "train_path": JSONL, "validation_path": JSONL, "output_dir": DIR,
                 "cpu": bool, "train": {TrainSpec fields}, "mlflow": {"tracking_uri", "run_id"} | null,
                 "loss_chunk_tokens": N | null (the loss a chunk of tokens at a time; null: the full logits),
                 "card": {"base_model", "base_revision", "base_sha", "data_md5", ...} | null}

What it writes into the output folder (durable: a retry or a rerun finds it there):

    checkpoints/step-NNNNNNNN/   every train.checkpoint_steps: accelerate.save_state (trainable weights,
                                 optimizer, scheduler, RNG states) + trainer_state.json (step, epoch,
                                 batches consumed in the epoch, metric history). The newest complete one
                                 is resumed from automatically; a half-written one ends in .partial.
    steps.jsonl                  one line per optimizer step: {step, loss, lr, pid, resumed_from}
    adapter/, merged/            the final adapter and merged model, each with tokenizer and README.md
    loss_curve.png, result.json  result.json is what the Prefect task reads back

Checkpoints are removed once the final model is saved.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader, Sampler

from gauntlet.data.sft import IGNORE_INDEX, collate, pack, read_jsonl, resolve_format, tokenize_rows
from gauntlet.files import write_json, write_text
from gauntlet.programs.train_kit import (
    CHECKPOINTS,
    Checkpointer,
    ChunkedLoss,
    MetricsSink,
    StepLog,
    latest_checkpoint,
    model_card,
    peak_memory_gb,
    plot_loss,
    shards_weights,
    validation_loss,
)

__all__ = ["IGNORE_INDEX", "train", "main", "latest_checkpoint"]


# ---------------------------------------------------------------------------------------------
# data order: a different, reproducible shuffle each epoch, so a resumed run sees the same batches
# ---------------------------------------------------------------------------------------------


class EpochShuffle(Sampler):
    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:   # accelerate's prepared loaders forward set_epoch here
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


def load_examples(path: str, fmt: str, tokenizer, cfg: dict, say) -> list:
    examples, dropped = tokenize_rows(read_jsonl(path), fmt, tokenizer, cfg["max_seq_len"])
    if dropped:
        say(f"[trainer] warning: {dropped} row(s) of {path} dropped: max_seq_len={cfg['max_seq_len']} cuts off "
            "their whole response")
    if not examples:
        raise SystemExit(f"no trainable rows in {path}: every response lies beyond train.max_seq_len")
    return examples


# ---------------------------------------------------------------------------------------------
# model: 4-bit NF4 base + LoRA (qlora), 16-bit base + LoRA (lora), or all weights (full)
# ---------------------------------------------------------------------------------------------


def make_accelerator(cfg: dict, cpu: bool) -> Accelerator:
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available():
        # DeepSpeed on the CPU: accelerate only picks a process-group backend for accelerators, and
        # cpu=True would turn DeepSpeed off; gloo is DeepSpeed's CPU backend.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        cpu = False
    return Accelerator(gradient_accumulation_steps=cfg["gradient_accumulation_steps"], cpu=cpu,
                       kwargs_handlers=handlers)


def compute_dtype(accelerator: Accelerator) -> torch.dtype:
    on_gpu = accelerator.device.type == "cuda"
    return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32


def load_model(base_model: str, cfg: dict, accelerator: Accelerator, checkpointing: bool):
    from transformers import AutoModelForCausalLM

    on_gpu = accelerator.device.type == "cuda"
    dtype = compute_dtype(accelerator)
    sharded = shards_weights(accelerator)
    kwargs: dict = {"dtype": dtype}
    if cfg["method"] == "qlora":
        from transformers import BitsAndBytesConfig

        quant = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                     bnb_4bit_compute_dtype=dtype)
        if sharded:
            # FSDP/ZeRO-3 shard flat tensors of one dtype: pack the 4-bit weights into compute-dtype storage,
            # and let the sharding place them (no device_map).
            quant["bnb_4bit_quant_storage"] = dtype
        else:
            # bitsandbytes places the weights itself: one full copy per process, on that process's device.
            kwargs["device_map"] = {"": accelerator.local_process_index} if on_gpu else "cpu"
        kwargs["quantization_config"] = BitsAndBytesConfig(**quant)
    model = AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    checkpointing_kwargs = {"use_reentrant": False}
    if cfg["method"] == "qlora" and not sharded:
        from peft import prepare_model_for_kbit_training

        # upcasts the non-quantized weights (norms, embeddings, head) to fp32 for stable training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing_kwargs)
    elif checkpointing:
        # sharded QLoRA keeps one dtype (no fp32 upcast), so it enables checkpointing directly
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    if cfg["method"] == "full":
        return model
    from peft import LoraConfig, get_peft_model

    lora = cfg["lora"]
    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["target_modules"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def make_optimizer(model, cfg: dict, accelerator: Accelerator) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; DeepSpeed's CPU Adam when ZeRO offloads the optimizer (DeepSpeed
    refuses a torch optimizer there; its CPU Adam is an op it compiles on first use)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": cfg["learning_rate"], "weight_decay": cfg["weight_decay"]}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme"):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def merge_and_save(base_model: str, adapter_dir: Path, merged_dir: Path, tokenizer, dtype: torch.dtype) -> None:
    """Merge the adapter into an unquantized copy of the base (4-bit weights cannot be merged exactly)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)



# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------


def train(args: dict) -> dict:
    cfg = args["train"]
    out = Path(args["output_dir"])
    accelerator = make_accelerator(cfg, args.get("cpu", False))
    set_seed(cfg["seed"])
    main = accelerator.is_main_process
    say = accelerator.print
    sink = MetricsSink(args.get("mlflow"), enabled=main)

    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    tokenizer = AutoTokenizer.from_pretrained(args["base_model"])
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.get("chat_template"):
        tokenizer.chat_template = cfg["chat_template"]
    fmt = resolve_format(cfg.get("data_format", "auto"), read_jsonl(args["train_path"])[:1])
    train_examples = load_examples(args["train_path"], fmt, tokenizer, cfg, say)
    val_examples = load_examples(args["validation_path"], fmt, tokenizer, cfg, say)
    train_items = pack(train_examples, cfg["max_seq_len"]) if cfg.get("packing") else train_examples

    def batches(items, sampler=None):
        return DataLoader(items, batch_size=cfg["batch_size"], sampler=sampler,
                          collate_fn=lambda b: collate(b, tokenizer.pad_token_id))

    checkpointing = cfg.get("gradient_checkpointing")
    if checkpointing is None:
        checkpointing = accelerator.device.type == "cuda"
    model = load_model(args["base_model"], cfg, accelerator, checkpointing)
    loss_of = ChunkedLoss(model, args.get("loss_chunk_tokens"), accelerator)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"[trainer] method={cfg['method']} trainable={trainable:,}/{total:,} format={fmt} "
        f"examples={len(train_examples)} rows={len(train_items)}{' (packed)' if cfg.get('packing') else ''} "
        f"device={accelerator.device} processes={accelerator.num_processes} "
        f"distributed={accelerator.distributed_type.value} gradient_checkpointing={checkpointing} "
        f"loss={'chunked by ' + str(loss_of.chunk) + ' tokens' if loss_of.chunked else 'full logits'}")
    optimizer = make_optimizer(model, cfg, accelerator)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg["warmup_steps"], cfg["max_steps"])
    train_loader = batches(train_items, EpochShuffle(len(train_items), cfg["seed"]))
    val_loader = batches(val_examples)
    # The scheduler stays out of prepare(): accelerate would step it once per process per step, and
    # max_steps counts optimizer steps. It is stepped below after each optimizer step, and checkpointed.
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    accelerator.register_for_checkpointing(scheduler)

    checkpoints = Checkpointer(accelerator, model, out, cfg.get("checkpoint_keep", 2),
                               adapters_only=cfg["method"] != "full")
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "history": [], "elapsed_s": 0.0}
    resume = latest_checkpoint(out)
    if resume:
        state = checkpoints.load(resume)
        sink.history = state["history"]
        say(f"[trainer] resumed from checkpoint {resume.name}: step {state['step']}, epoch {state['epoch']}, "
            f"batch {state['batch_in_epoch']} of the epoch")
    step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    steplog = StepLog(out / "steps.jsonl", main, resumed_from=step)

    max_steps, every_ckpt, every_eval = cfg["max_steps"], cfg.get("checkpoint_steps"), cfg.get("eval_steps")
    tokens, started, window_start = 0, time.time(), time.time()
    running: list[float] = []   # micro-batch losses of the logging window
    micro: list[float] = []     # ... of the current optimizer step
    model.train()
    while step < max_steps:
        loader = accelerator.skip_first_batches(train_loader, batch_in_epoch) if batch_in_epoch else train_loader
        loader.set_epoch(epoch)
        for batch in loader:
            n_tokens = batch.pop("n_tokens")
            with accelerator.accumulate(model):
                loss = loss_of(model, batch)
                accelerator.backward(loss)
                grad_norm = (accelerator.clip_grad_norm_(model.parameters(), 1.0)
                             if accelerator.sync_gradients else None)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            batch_in_epoch += 1
            tokens += int(n_tokens) * accelerator.num_processes
            running.append(loss.item())
            micro.append(running[-1])
            if not accelerator.sync_gradients:
                continue
            step += 1
            lr = scheduler.get_last_lr()[0]
            steplog.write(step, sum(micro) / len(micro), lr)
            micro = []
            logging_now = step % cfg["logging_steps"] == 0 or step == max_steps
            eval_now = step == max_steps or bool(every_eval and step % every_eval == 0)
            if logging_now:
                elapsed = time.time() - window_start
                metrics = {"train_loss": sum(running) / len(running), "learning_rate": lr,
                           "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                           "tokens_per_s": tokens / max(elapsed, 1e-9), "epoch": float(epoch),
                           "peak_memory_gb": peak_memory_gb(accelerator.device)}
                if eval_now:
                    metrics["val_loss"] = validation_loss(model, val_loader, accelerator, loss_of)
                sink.log(step, metrics)
                say(f"[trainer] step {step}/{max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                running, tokens, window_start = [], 0, time.time()
            paused = time.time()   # evaluation and checkpoints do not count against tokens/s
            if eval_now and not logging_now:
                sink.log(step, {"val_loss": validation_loss(model, val_loader, accelerator, loss_of)})
            if every_ckpt and step % every_ckpt == 0 and step < max_steps:
                saved = checkpoints.save({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                                          "history": sink.history,
                                          "elapsed_s": state["elapsed_s"] + time.time() - started})
                say(f"[trainer] checkpoint {saved.name} saved (step {step})")
            window_start += time.time() - paused
            if step >= max_steps:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
    steplog.close()

    loss_of.restore()
    # the final weights: ZeRO-3/FSDP gather them from every process, so all processes take part
    gathered = {"state_dict": accelerator.get_state_dict(model)} if shards_weights(accelerator) else {}
    unwrapped = accelerator.unwrap_model(model)
    adapter_dir, merged_dir = out / "adapter", out / "merged"
    if main:
        target = merged_dir if cfg["method"] == "full" else adapter_dir
        unwrapped.save_pretrained(target, **gathered)
        tokenizer.save_pretrained(target)
    accelerator.wait_for_everyone()
    dtype = compute_dtype(accelerator)
    accelerator.end_training()   # the other processes are done; merging below is the main process's alone
    result: dict = {"steps": step, "duration_s": state["elapsed_s"] + time.time() - started,
                    "resumed_from_step": state["step"],
                    "data_format": fmt}
    if not main:
        return result
    if cfg["method"] != "full":
        merge_and_save(args["base_model"], adapter_dir, merged_dir, tokenizer, dtype)
        result["adapter_path"] = str(adapter_dir)
    plot_loss(sink.history, out / "loss_curve.png")
    last = sink.history[-1]
    result.update(merged_path=str(merged_dir), loss_curve=str(out / "loss_curve.png"),
                  metrics={"train_loss": last["train_loss"], "val_loss": last.get("val_loss", math.nan),
                           "train_duration_s": result["duration_s"]},
                  history=sink.history)
    for kind, folder in (("adapter", adapter_dir), ("merged", merged_dir)):
        if folder.exists():
            write_text(folder / "README.md", model_card(args, result, kind))
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    write_json(out / "result.json", result)   # read by the training stage: whole or not at all
    say(f"[trainer] done: {step} steps in {result['duration_s']:.1f}s; merged model at {merged_dir}")
    return result


def die_with_launcher() -> None:
    """Linux: be killed when the process that started this one dies.

    torchrun starts each training process in a session of its own, so stopping the launcher's process
    group (``kill -- -$(cat trainer.pid)``, see gauntlet/training.py) would leave them running, writing into
    the folder a retry is about to use. With this, they go down with their launcher.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:   # the launcher died before the line above
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune a causal LM (QLoRA/LoRA/full) from a Gauntlet args file.")
    parser.add_argument("--args", required=True, help="JSON file written by gauntlet/training.py")
    ns = parser.parse_args(argv)
    die_with_launcher()
    args = json.loads(Path(ns.args).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(args)


if __name__ == "__main__":
    main()
