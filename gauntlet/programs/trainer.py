"""The training program: QLoRA / LoRA / full fine-tuning of a causal LM on alpaca or chat JSONL.

A plain program with no Prefect inside, readable top to bottom (its parts, the chunked loss, checkpoints,
metrics and the model card, are in ``train_kit.py`` beside it; the accelerator, model, optimizer and merge in
``train_setup.py``), launched by ``gauntlet/training.py`` as
``accelerate launch [--config_file deployments/accelerate/<profile>.yaml] -m gauntlet.programs.trainer --args ARGS.json``;
it can be run by hand the same way.

    ARGS.json = {"base_model": DIR, "train_path": JSONL, "validation_path": JSONL, "output_dir": DIR,
                 "cpu": bool, "train": {TrainSpec fields}, "mlflow": {"tracking_uri", "run_id"} | null,
                 "loss_chunk_tokens": N | null (the loss a chunk of tokens at a time; null: the full logits),
                 "card": {"name", "base_model", "base_revision", "base_sha", "data_md5", ...} | null}

validated into ``train_kit.TrainerArgs`` (its ``train`` is the run config's own ``TrainSpec``) before anything
loads: a bad file stops the program with pydantic's message naming the field. ``train()`` reads as its three
steps: :func:`setup` (accelerator, data, model, optimizer, resume), :func:`train_loop` (micro-batches,
optimizer steps, logging, validation, checkpoints) and :func:`save_outputs` (adapter, merged model, card).

What it writes into the output folder (durable: a retry or a rerun finds it there):

    checkpoints/step-NNNNNNNN/   every train.checkpoint_steps: accelerate.save_state (trainable weights,
                                 optimizer, scheduler, RNG states) + trainer_state.json (step, epoch,
                                 batches consumed in the epoch, metric history). The newest complete one
                                 is resumed from automatically; a half-written one ends in .partial.
    steps.jsonl                  one line per optimizer step: {step, loss, lr, grad_norm (before clipping),
                                 applied_grad_norm (what the optimizer stepped with), pid, resumed_from}
    adapter/, merged/            the final adapter and merged model, each with tokenizer and README.md
    loss_curve.png, result.json  result.json is what the Prefect task reads back

Checkpoints are removed once the final model is saved.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader, Sampler

from gauntlet.config.train import TrainSpec
from gauntlet.data.sft import IGNORE_INDEX, Format, collate, pack, read_jsonl, resolve_format, tokenize_rows
from gauntlet.programs.train_kit import (
    AppliedGradNorm,
    Checkpointer,
    ChunkedLoss,
    MetricsSink,
    StepLog,
    TrainerArgs,
    clip_gradients,
    latest_checkpoint,
    peak_memory_gb,
    read_args,
    shards_weights,
    validation_loss,
)
from gauntlet.programs.train_setup import compute_dtype, load_model, make_accelerator, make_optimizer, write_outputs

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


def load_examples(path: str, fmt: Format, tokenizer, spec: TrainSpec, say) -> list:
    examples, dropped = tokenize_rows(read_jsonl(path), fmt, tokenizer, spec.max_seq_len)
    if dropped:
        say(f"[trainer] warning: {dropped} row(s) of {path} dropped: max_seq_len={spec.max_seq_len} cuts off "
            "their whole response")
    if not examples:
        raise SystemExit(f"no trainable rows in {path}: every response lies beyond train.max_seq_len")
    return examples


def load_tokenizer(base_model: str, spec: TrainSpec):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.chat_template:
        tokenizer.chat_template = spec.chat_template
    return tokenizer


def batches(items: list, batch_size: int, pad_id: int, sampler: Sampler | None = None) -> DataLoader:
    return DataLoader(items, batch_size=batch_size, sampler=sampler, collate_fn=lambda b: collate(b, pad_id))


# ---------------------------------------------------------------------------------------------
# the recipe: setup, the loop, the outputs
# ---------------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Where the loop stands: what a checkpoint saves (step, epoch, batches of the epoch consumed, training
    time of earlier attempts) and the current logging window."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    earlier_s: float = 0.0        # training time of the attempts before this one (from the checkpoint)
    resumed_from: int = 0
    started: float = field(default_factory=time.time)
    window_start: float = field(default_factory=time.time)
    tokens: int = 0               # of the logging window
    running: list[float] = field(default_factory=list)   # micro-batch losses of the logging window
    micro: list[float] = field(default_factory=list)     # ... of the current optimizer step

    @classmethod
    def from_checkpoint(cls, state: dict) -> Progress:
        return cls(step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
                   earlier_s=state["elapsed_s"], resumed_from=state["step"])

    def duration_s(self) -> float:
        return self.earlier_s + time.time() - self.started

    def checkpoint_state(self, history: list[dict]) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "history": history,
                "elapsed_s": self.duration_s()}


@dataclass
class Run:
    """What the steps of one training share: the prepared model, optimizer, scheduler and loaders, the
    places metrics go, and the loop's progress."""

    args: TrainerArgs
    accelerator: Accelerator
    tokenizer: Any
    fmt: str
    model: Any
    loss_of: ChunkedLoss
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    applied: AppliedGradNorm
    checkpoints: Checkpointer
    sink: MetricsSink
    progress: Progress
    steplog: StepLog = None  # type: ignore[assignment]  # opened by resume(), before the loop writes to it

    @property
    def spec(self) -> TrainSpec:
        return self.args.train

    @property
    def say(self) -> Callable[[str], None]:
        return self.accelerator.print


def setup(args: TrainerArgs) -> Run:
    """The accelerator, the tokenized data, the model and its loss, optimizer and scheduler, prepared by
    accelerate; resumed from the newest checkpoint in the output folder when there is one."""
    from transformers import get_linear_schedule_with_warmup

    spec = args.train
    accelerator = make_accelerator(spec, args.cpu)
    set_seed(spec.seed)
    say = accelerator.print
    tokenizer = load_tokenizer(args.base_model, spec)
    fmt = resolve_format(spec.data_format, read_jsonl(args.train_path)[:1])
    train_examples = load_examples(args.train_path, fmt, tokenizer, spec, say)
    val_examples = load_examples(args.validation_path, fmt, tokenizer, spec, say)
    train_items = pack(train_examples, spec.max_seq_len) if spec.packing else train_examples
    checkpointing = (spec.gradient_checkpointing if spec.gradient_checkpointing is not None
                     else accelerator.device.type == "cuda")
    model = load_model(args.base_model, spec, accelerator, checkpointing)
    loss_of = ChunkedLoss(model, args.loss_chunk_tokens, accelerator)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    say(f"[trainer] method={spec.method} trainable={trainable:,}/{total:,} format={fmt} "
        f"examples={len(train_examples)} rows={len(train_items)}{' (packed)' if spec.packing else ''} "
        f"device={accelerator.device} processes={accelerator.num_processes} "
        f"distributed={accelerator.distributed_type.value} gradient_checkpointing={checkpointing} "
        f"loss={'chunked by ' + str(loss_of.chunk) + ' tokens' if loss_of.chunked else 'full logits'} "
        f"max_grad_norm={spec.max_grad_norm}")
    optimizer = make_optimizer(model, spec, accelerator)
    applied = AppliedGradNorm(optimizer, accelerator)
    scheduler = get_linear_schedule_with_warmup(optimizer, spec.warmup_steps, spec.max_steps)
    train_loader = batches(train_items, spec.batch_size, tokenizer.pad_token_id,
                           EpochShuffle(len(train_items), spec.seed))
    val_loader = batches(val_examples, spec.batch_size, tokenizer.pad_token_id)
    # The scheduler stays out of prepare(): accelerate would step it once per process per step, and
    # max_steps counts optimizer steps. It is stepped after each optimizer step, and checkpointed.
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    accelerator.register_for_checkpointing(scheduler)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        say(f"[trainer] DeepSpeed clips gradients at {model.gradient_clipping()} (0: no clipping)")
    run = Run(args=args, accelerator=accelerator, tokenizer=tokenizer, fmt=fmt, model=model, loss_of=loss_of,
              optimizer=optimizer, scheduler=scheduler, train_loader=train_loader, val_loader=val_loader,
              applied=applied, sink=MetricsSink(args.mlflow, enabled=accelerator.is_main_process),
              checkpoints=Checkpointer(accelerator, model, Path(args.output_dir), spec.checkpoint_keep,
                                       adapters_only=spec.method != "full"),
              progress=Progress())
    resume(run)
    return run


def resume(run: Run) -> None:
    """Continue from the newest complete checkpoint of the output folder, if an earlier attempt left one."""
    out = Path(run.args.output_dir)
    checkpoint = latest_checkpoint(out)
    if checkpoint:
        state = run.checkpoints.load(checkpoint)
        run.sink.history = state["history"]
        run.progress = Progress.from_checkpoint(state)
        run.say(f"[trainer] resumed from checkpoint {checkpoint.name}: step {state['step']}, epoch "
                f"{state['epoch']}, batch {state['batch_in_epoch']} of the epoch")
    run.steplog = StepLog(out / "steps.jsonl", run.accelerator.is_main_process, resumed_from=run.progress.step)


def train_loop(run: Run) -> None:
    """Micro-batches until ``train.max_steps`` optimizer steps; each epoch in its own seeded order, a resumed
    epoch skipping the batches already consumed."""
    p, max_steps = run.progress, run.spec.max_steps
    run.model.train()
    while p.step < max_steps:
        loader = (run.accelerator.skip_first_batches(run.train_loader, p.batch_in_epoch) if p.batch_in_epoch
                  else run.train_loader)
        loader.set_epoch(p.epoch)
        for batch in loader:
            grad_norm = micro_step(run, batch)
            if not run.accelerator.sync_gradients:
                continue
            after_optimizer_step(run, grad_norm)
            if p.step >= max_steps:
                break
        else:
            p.epoch, p.batch_in_epoch = p.epoch + 1, 0
    run.steplog.close()


def micro_step(run: Run, batch: dict) -> float | None:
    """Forward and backward on one micro-batch; at the last of an optimizer step's micro-batches also clip,
    step the optimizer and the scheduler. Returns the gradients' norm before clipping (None between steps)."""
    acc, p = run.accelerator, run.progress
    n_tokens = batch.pop("n_tokens")
    with acc.accumulate(run.model):
        loss = run.loss_of(run.model, batch)
        acc.backward(loss)
        grad_norm = clip_gradients(acc, run.model, run.spec.max_grad_norm) if acc.sync_gradients else None
        run.optimizer.step()
        if acc.sync_gradients:
            run.scheduler.step()
        run.optimizer.zero_grad()
    p.batch_in_epoch += 1
    p.tokens += int(n_tokens) * acc.num_processes
    p.running.append(loss.item())
    p.micro.append(p.running[-1])
    return grad_norm


def after_optimizer_step(run: Run, grad_norm: float | None) -> None:
    """Count the step; log it; every ``logging_steps`` send metrics, every ``eval_steps`` the validation loss,
    every ``checkpoint_steps`` save a checkpoint (evaluation and checkpoints do not count against tokens/s)."""
    spec, p = run.spec, run.progress
    p.step += 1
    lr = run.scheduler.get_last_lr()[0]
    run.steplog.write(p.step, sum(p.micro) / len(p.micro), lr, grad_norm, run.applied.value)
    p.micro = []
    last = p.step == spec.max_steps
    logging_now = p.step % spec.logging_steps == 0 or last
    eval_now = last or bool(spec.eval_steps and p.step % spec.eval_steps == 0)
    if logging_now:
        log_window(run, lr, grad_norm, eval_now)
    paused = time.time()
    if eval_now and not logging_now:
        run.sink.log(p.step, {"val_loss": validation_loss(run.model, run.val_loader, run.accelerator, run.loss_of)})
    if spec.checkpoint_steps and p.step % spec.checkpoint_steps == 0 and not last:
        saved = run.checkpoints.save(p.checkpoint_state(run.sink.history))
        run.say(f"[trainer] checkpoint {saved.name} saved (step {p.step})")
    p.window_start += time.time() - paused


def log_window(run: Run, lr: float, grad_norm: float | None, with_validation: bool) -> None:
    """The logging window's metrics to MLflow and stdout; a new window starts."""
    p = run.progress
    metrics = {"train_loss": sum(p.running) / len(p.running), "learning_rate": lr,
               "grad_norm": grad_norm if grad_norm is not None else 0.0,
               "tokens_per_s": p.tokens / max(time.time() - p.window_start, 1e-9), "epoch": float(p.epoch),
               "peak_memory_gb": peak_memory_gb(run.accelerator.device)}
    if run.applied.value is not None:
        metrics["applied_grad_norm"] = run.applied.value
    if with_validation:
        metrics["val_loss"] = validation_loss(run.model, run.val_loader, run.accelerator, run.loss_of)
    run.sink.log(p.step, metrics)
    run.say(f"[trainer] step {p.step}/{run.spec.max_steps} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    p.running, p.tokens, p.window_start = [], 0, time.time()


def save_outputs(run: Run) -> dict:
    """The adapter (or the full model), the merged model, the loss curve, the model cards and ``result.json``;
    the checkpoints removed. Every process takes part in gathering sharded weights; the rest is the main
    process's."""
    acc, spec, out, p = run.accelerator, run.spec, Path(run.args.output_dir), run.progress
    run.loss_of.restore()
    # the final weights: ZeRO-3/FSDP gather them from every process, so all processes take part
    gathered = {"state_dict": acc.get_state_dict(run.model)} if shards_weights(acc) else {}
    unwrapped = acc.unwrap_model(run.model)
    adapter_dir, merged_dir = out / "adapter", out / "merged"
    if acc.is_main_process:
        target = merged_dir if spec.method == "full" else adapter_dir
        unwrapped.save_pretrained(target, **gathered)
        run.tokenizer.save_pretrained(target)
    acc.wait_for_everyone()
    dtype = compute_dtype(acc)
    acc.end_training()   # the other processes are done; merging below is the main process's alone
    result: dict = {"steps": p.step, "duration_s": p.duration_s(), "resumed_from_step": p.resumed_from,
                    "data_format": run.fmt}
    if not acc.is_main_process:
        return result
    write_outputs(run.args, run.tokenizer, result, run.sink.history, dtype)
    run.say(f"[trainer] done: {p.step} steps in {result['duration_s']:.1f}s; merged model at {merged_dir}")
    return result


def train(args: TrainerArgs) -> dict:
    run = setup(args)
    train_loop(run)
    return save_outputs(run)


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


def run_program(description: str, train_fn: Callable[[TrainerArgs], Any], argv: list[str] | None = None) -> None:
    """A training program's command line (this one's and the preference program's): ``--args FILE``, read before
    anything loads (a bad file costs nothing), then ``train_fn``; the program dies with its launcher."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--args", required=True, help="JSON file written by gauntlet/training.py")
    ns = parser.parse_args(argv)
    die_with_launcher()
    args = read_args(Path(ns.args))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train_fn(args)


def main(argv: list[str] | None = None) -> None:
    run_program("Fine-tune a causal LM (QLoRA/LoRA/full) from a Gauntlet args file.", train, argv)


if __name__ == "__main__":
    main()
