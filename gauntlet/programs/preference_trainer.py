"""The preference training program: DPO, IPO, SimPO, ORPO or KTO on TRL's maintained trainers.

Launched like the SFT program (``gauntlet/programs/trainer.py``) by ``gauntlet/training.py``, with the same
arguments file (``train_kit.TrainerArgs``), as
``accelerate launch [...] -m gauntlet.programs.preference_trainer --args ARGS.json``. The loss is TRL's
(``DPOTrainer`` with its loss types for dpo and ipo, ``CPOTrainer``'s SimPO loss, ``ORPOTrainer``, ``KTOTrainer``):
nothing here computes a preference loss. What Gauntlet adds around TRL's loop, from the SFT program's parts:

- the model as ``train.method`` loads it (``train_setup.load_base``: 4-bit NF4 for qlora) and the LoRA config, which
  TRL applies: under an adapter the reference is the base with the adapter disabled, no second copy in memory;
- the step log (``steps.jsonl``, every optimizer step) and the MLflow metrics (``train_kit.MetricsSink``) under
  TRL's names (``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
  ``kl`` where the method reports it), plus ``train_loss``/``val_loss`` as the SFT program names them;
- checkpoints where the stage looks for them: TRL's (the Trainer's: adapter, optimizer, scheduler, RNG states,
  data position) renamed whole into ``checkpoints/step-NNNNNNNN`` once written, resumed from the newest, so a
  retry after a kill trains no step twice;
- the validation loss (TRL's, with its reward metrics as ``val_rewards/...``) every ``eval_steps`` and at the end;
- the held-out preference accuracy, per pair (does the model give ``chosen`` a higher log-likelihood than
  ``rejected`` on the validation pairs it never trained on), measured before training (the base) and after, into
  ``result.json`` for the training stage's paired test;
- the outputs of the SFT program (``train_setup.write_outputs``): adapter, merged model, cards, ``result.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from transformers import PrinterCallback, TrainerCallback

from gauntlet.config.train import REFERENCE_FREE, TrainSpec
from gauntlet.data.preference import OBJECTIVE_LAYOUT
from gauntlet.data.sft import read_jsonl
from gauntlet.programs.train_kit import CHECKPOINTS, MetricsSink, StepLog, TrainerArgs, latest_checkpoint
from gauntlet.programs.train_setup import compute_dtype, load_base, lora_config, make_accelerator, write_outputs
from gauntlet.programs.trainer import load_tokenizer, run_program

HF_CHECKPOINTS = "trl-checkpoints"   # where the Trainer writes checkpoint-N before it is renamed into checkpoints/


# ---------------------------------------------------------------------------------------------
# the TRL trainer and its config for each objective
# ---------------------------------------------------------------------------------------------


def trainer_class(objective: str) -> tuple[Any, Any]:
    """TRL's trainer and config classes for ``objective``."""
    if objective in ("dpo", "ipo"):
        from trl import DPOConfig, DPOTrainer

        return DPOTrainer, DPOConfig
    if objective == "kto":
        from trl import KTOConfig, KTOTrainer

        return KTOTrainer, KTOConfig
    if objective == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ORPOTrainer, ORPOConfig
    from trl.experimental.cpo import CPOConfig, CPOTrainer  # SimPO is CPO's loss with cpo_alpha 0

    return CPOTrainer, CPOConfig


def objective_settings(spec: TrainSpec) -> dict:
    """``train.preference`` as the TRL config of ``train.objective`` names it (unset: TRL's defaults)."""
    pref, objective = spec.preference_settings(), spec.objective
    out: dict = {"beta": pref.beta, "max_length": spec.max_seq_len}
    if objective == "dpo":
        out["loss_type"] = [pref.loss_type or "sigmoid"]
    elif objective == "ipo":
        out["loss_type"] = ["ipo"]
    elif objective == "kto":
        out.update(loss_type=pref.loss_type or "kto")
        out.update({k: v for k, v in (("desirable_weight", pref.desirable_weight),
                                      ("undesirable_weight", pref.undesirable_weight)) if v is not None})
    elif objective == "simpo":
        out.update(loss_type="simpo", cpo_alpha=0.0)
        if pref.simpo_gamma is not None:
            out["simpo_gamma"] = pref.simpo_gamma
    if objective in ("simpo", "orpo") and pref.max_completion_length is not None:
        out["max_completion_length"] = pref.max_completion_length
    return out


def trl_config(args: TrainerArgs, config_class: Any, on_gpu_bf16: bool) -> Any:
    """The Trainer's arguments from ``train:``: the same optimizer settings and linear schedule as the SFT program,
    a log line every step (the step log; MLflow gets the ``logging_steps`` window), checkpoints every
    ``checkpoint_steps``, no reporting of its own (the metrics go to the stage's MLflow run)."""
    spec = args.train
    checkpointing = bool(spec.gradient_checkpointing) if spec.gradient_checkpointing is not None else (
        torch.cuda.is_available() and not args.cpu)
    return config_class(
        output_dir=str(Path(args.output_dir) / HF_CHECKPOINTS), per_device_train_batch_size=spec.batch_size,
        per_device_eval_batch_size=spec.batch_size, gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate, max_steps=spec.max_steps, warmup_steps=spec.warmup_steps,
        weight_decay=spec.weight_decay, max_grad_norm=spec.max_grad_norm or 0.0, lr_scheduler_type="linear",
        seed=spec.seed, data_seed=spec.seed, logging_steps=1, report_to="none", disable_tqdm=True,
        save_strategy="steps" if spec.checkpoint_steps else "no", save_steps=spec.checkpoint_steps or 500,
        eval_strategy="steps" if spec.eval_steps else "no", eval_steps=spec.eval_steps,
        gradient_checkpointing=checkpointing, use_cpu=args.cpu, bf16=on_gpu_bf16,
        dataloader_num_workers=0, **objective_settings(spec))


# ---------------------------------------------------------------------------------------------
# what Gauntlet keeps of TRL's loop: the step log, MLflow, checkpoints where the stage finds them
# ---------------------------------------------------------------------------------------------


class GauntletCallback(TrainerCallback):
    """Every optimizer step into ``steps.jsonl``; every ``logging_steps`` the window's mean of TRL's metrics into
    MLflow; each checkpoint the Trainer finishes renamed whole into ``checkpoints/step-NNNNNNNN``."""

    def __init__(self, spec: TrainSpec, out: Path, sink: MetricsSink, steplog: StepLog, say):
        self.spec, self.out, self.sink, self.steplog, self.say = spec, out, sink, steplog, say
        self.window: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        step = state.global_step
        if any(k.startswith("eval_") for k in logs):   # a validation pass: sent as it comes
            metrics = {k.removeprefix("eval_"): v for k, v in logs.items() if k.startswith("eval_")}
            self.sink.log(step, {"val_loss": metrics.get("loss", math.nan),
                                 **{f"val_{k}": v for k, v in metrics.items() if "/" in k}})
            return
        if "loss" not in logs:   # the Trainer's closing summary (train_runtime, ...)
            return
        self.steplog.write(step, logs["loss"], logs.get("learning_rate", 0.0), logs.get("grad_norm"), None)
        self.window.append(logs)
        if step % self.spec.logging_steps == 0 or step >= self.spec.max_steps:
            keys = {k for w in self.window for k in w}
            mean = {k: sum(w[k] for w in self.window if k in w) / sum(k in w for w in self.window) for k in keys}
            self.sink.log(step, {"train_loss": mean["loss"], **mean})
            self.say(f"[trainer] step {step}/{self.spec.max_steps} " + " ".join(
                f"{k}={mean[k]:.4g}" for k in ("loss", "rewards/accuracies", "rewards/margins", "kl") if k in mean))
            self.window = []

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        written = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        final = self.out / CHECKPOINTS / f"step-{state.global_step:08d}"
        # the metric history rides with the checkpoint, so a resumed run's loss curve is whole
        (written / "gauntlet_history.json").write_text(json.dumps(self.sink.history))
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        written.rename(final)   # whole or not at all: the stage only takes step-* folders
        for old in sorted(p for p in final.parent.glob("step-*") if "." not in p.name)[:-self.spec.checkpoint_keep]:
            shutil.rmtree(old, ignore_errors=True)
        self.say(f"[trainer] checkpoint {final.name} saved (step {state.global_step})")


# ---------------------------------------------------------------------------------------------
# held-out preference accuracy: per pair, before and after
# ---------------------------------------------------------------------------------------------


def scored_ids(tokenizer, prompt: Any, completion: Any, max_len: int) -> tuple[list[int], int]:
    """The token ids of ``prompt`` + ``completion`` (chat turns rendered with the chat template; the completion
    ending with EOS, as TRL trains it), and where the completion starts."""
    if isinstance(prompt, list):
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        completion = "".join(t["content"] for t in completion)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return (prompt_ids + answer_ids)[:max_len], len(prompt_ids)


def completion_logps(model, sequences: list[tuple[list[int], int]], pad_id: int, batch_size: int) -> list[float]:
    """Sum of the log-probabilities of each sequence's completion tokens, a padded batch at a time (one row at a
    time is bitsandbytes' slowest 4-bit path on the CPU)."""
    device = next(model.parameters()).device
    sums: list[float] = []
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width - 1), dtype=torch.bool)   # predicted tokens of the completion
        for row, (seq, start) in enumerate(chunk):
            ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
            scored[row, max(start, 1) - 1:len(seq) - 1] = True   # logits[t] predicts ids[t + 1]
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:].to(device)[..., None])[..., 0]
        sums += (logp * scored.to(device)).sum(dim=1).tolist()   # a completion cut off entirely scores 0
    return sums


@torch.no_grad()
def preference_accuracy(model, tokenizer, rows: list[dict], max_len: int, batch_size: int = 16) -> list[float]:
    """1.0 for each pair whose chosen completion the model finds likelier than its rejected one, else 0.0."""
    was_training = model.training
    model.eval()
    sequences = [scored_ids(tokenizer, r["prompt"], r[side], max_len) for r in rows for side in ("chosen", "rejected")]
    logps = completion_logps(model, sequences, tokenizer.pad_token_id, batch_size)
    model.train(was_training)
    return [float(chosen > rejected) for chosen, rejected in zip(logps[::2], logps[1::2], strict=True)]


def held_out_accuracy(trainer, tokenizer, rows: list[dict], spec: TrainSpec, base: bool) -> list[float] | None:
    """The held-out preference accuracy of the model (``base``: with the adapter disabled, the reference); None for
    KTO rows, which hold no pairs."""
    if OBJECTIVE_LAYOUT[spec.objective] != "pairs":
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    if base and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            return preference_accuracy(model, tokenizer, rows, spec.max_seq_len, spec.batch_size)
    return preference_accuracy(model, tokenizer, rows, spec.max_seq_len, spec.batch_size)


# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------


def build(args: TrainerArgs) -> tuple[Any, Any, list[dict], GauntletCallback]:
    """The model as ``train.method`` loads it, TRL's trainer around it with Gauntlet's callback, the tokenizer and
    the held-out rows."""
    from datasets import Dataset

    spec, out = args.train, Path(args.output_dir)
    trainer_cls, config_cls = trainer_class(spec.objective)
    bf16 = torch.cuda.is_available() and not args.cpu and torch.cuda.is_bf16_supported()   # compute_dtype's rule
    config = trl_config(args, config_cls, bf16)   # before the accelerator: making it resets accelerate's state
    accelerator = make_accelerator(spec, args.cpu)   # the process state the Trainer's own accelerator joins
    set_seed(spec.seed)
    tokenizer = load_tokenizer(args.base_model, spec)
    train_rows, val_rows = read_jsonl(args.train_path), read_jsonl(args.validation_path)
    model = load_base(args.base_model, spec, accelerator, config.gradient_checkpointing)
    reference = None
    if args.reference_model and spec.objective in ("dpo", "ipo", "kto"):
        reference = load_base(args.reference_model, spec.model_copy(update={"method": "lora"})
                              if spec.method == "full" else spec, accelerator, False)
    out.mkdir(parents=True, exist_ok=True)
    sink = MetricsSink(args.mlflow, enabled=accelerator.is_main_process)
    resumed = latest_checkpoint(out)
    steplog = StepLog(out / "steps.jsonl", accelerator.is_main_process,
                      resumed_from=int(resumed.name.removeprefix("step-")) if resumed else 0)
    callback = GauntletCallback(spec, out, sink, steplog, accelerator.print)
    kwargs: dict = {"ref_model": reference} if spec.objective in ("dpo", "ipo", "kto") else {}
    trainer = trainer_cls(model=model, args=config, train_dataset=Dataset.from_list(train_rows),
                          eval_dataset=Dataset.from_list(val_rows),
                          processing_class=tokenizer, callbacks=[callback],
                          peft_config=None if spec.method == "full" else lora_config(spec), **kwargs)
    trainer.remove_callback(PrinterCallback)   # disable_tqdm's raw dict per step: the callback prints the window
    return trainer, tokenizer, val_rows, callback


def train(args: TrainerArgs) -> dict:
    spec, out = args.train, Path(args.output_dir)
    trainer, tokenizer, val_rows, callback = build(args)
    say = trainer.accelerator.print
    started = time.time()
    before = held_out_accuracy(trainer, tokenizer, val_rows, spec, base=True)
    resume = latest_checkpoint(out)
    if resume:
        callback.sink.history = json.loads((resume / "gauntlet_history.json").read_text())
        say(f"[trainer] resumed from checkpoint {resume.name}")
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    reference = ("none" if spec.objective in REFERENCE_FREE else args.reference_model
                 or ("base, adapter disabled" if spec.method != "full" else "base, a frozen copy"))
    say(f"[trainer] objective={spec.objective} method={spec.method} trl={type(trainer).__name__} "
        f"trainable={trainable:,} settings={objective_settings(spec)} reference={reference} "
        f"device={trainer.accelerator.device}")
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    callback.steplog.close()
    trainer.evaluate()   # the validation loss (and TRL's reward metrics) at the end, as the SFT program does
    after = held_out_accuracy(trainer, tokenizer, val_rows, spec, base=False)
    return save_outputs(args, trainer, tokenizer, callback, output, before, after, time.time() - started, resume)


def save_outputs(args: TrainerArgs, trainer, tokenizer, callback: GauntletCallback, output, before, after,
                 duration_s: float, resume: Path | None) -> dict:
    """The adapter (or the full model) saved, then the SFT program's outputs (``write_outputs``)."""
    spec, out = args.train, Path(args.output_dir)
    acc = trainer.accelerator
    target = out / ("merged" if spec.method == "full" else "adapter")
    trainer.save_model(str(target))   # every process: gathers sharded weights; writes on the main one
    result: dict = {"steps": int(output.global_step), "duration_s": duration_s, "data_format": spec.objective,
                    "resumed_from_step": int(resume.name.removeprefix("step-")) if resume else 0,
                    "train_runtime_s": float(output.metrics.get("train_runtime", math.nan))}   # TRL's loop alone
    if before is not None:
        result["preference_accuracy"] = {"base": before, "trained": after}
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return result
    tokenizer.save_pretrained(target)
    shutil.rmtree(out / HF_CHECKPOINTS, ignore_errors=True)
    result = write_outputs(args, tokenizer, result, callback.sink.history, compute_dtype(acc))
    acc.print(f"[trainer] done: {result['steps']} steps; merged model at {result['merged_path']}")
    return result


def main(argv: list[str] | None = None) -> None:
    run_program("Preference-tune a causal LM on TRL from a Gauntlet args file.", train, argv)


if __name__ == "__main__":
    main()
