"""What the training program (gauntlet/programs/trainer.py) sets up before its loop and uses after it: the
accelerator, the model (4-bit NF4 base + LoRA for qlora, 16-bit base + LoRA for lora, every weight for full),
its optimizer, and at the end the adapter merged into an unquantized copy of the base and the outputs written.
Both training programs (``trainer``, SFT; ``preference_trainer``, TRL's preference trainers) use them. No Prefect
here.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from gauntlet.config.train import TrainSpec
from gauntlet.files import write_json, write_text
from gauntlet.programs.train_kit import CHECKPOINTS, TrainerArgs, model_card, plot_loss, shards_weights


def make_accelerator(spec: TrainSpec, cpu: bool) -> Accelerator:
    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        # DeepSpeed clips inside its own step, at the value its plugin reads from here when the Accelerator is
        # made: train.max_grad_norm decides, not the launch profile (0: DeepSpeed does not clip).
        os.environ["ACCELERATE_GRADIENT_CLIPPING"] = str(spec.max_grad_norm or 0.0)
        if not torch.cuda.is_available():
            # DeepSpeed on the CPU: accelerate only picks a process-group backend for accelerators, and
            # cpu=True would turn DeepSpeed off; gloo is DeepSpeed's CPU backend.
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
            cpu = False
    return Accelerator(gradient_accumulation_steps=spec.gradient_accumulation_steps, cpu=cpu,
                       kwargs_handlers=handlers)


def compute_dtype(accelerator: Accelerator) -> torch.dtype:
    on_gpu = accelerator.device.type == "cuda"
    return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32


def load_model(base_model: str, spec: TrainSpec, accelerator: Accelerator, checkpointing: bool):
    """The model to train: the base (4-bit for qlora) with its LoRA adapter, or every weight for full."""
    model = load_base(base_model, spec, accelerator, checkpointing)
    if spec.method == "full":
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(spec))


def load_base(base_model: str, spec: TrainSpec, accelerator: Accelerator, checkpointing: bool):
    """The base model as ``train.method`` trains it: 4-bit NF4 (qlora, prepared for k-bit training) or in the
    compute dtype; without an adapter (the preference program hands TRL the adapter's config instead)."""
    from transformers import AutoModelForCausalLM

    on_gpu = accelerator.device.type == "cuda"
    dtype = compute_dtype(accelerator)
    sharded = shards_weights(accelerator)
    kwargs: dict = {"dtype": dtype}
    if spec.method == "qlora":
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
    if spec.method == "qlora" and not sharded:
        from peft import prepare_model_for_kbit_training

        # upcasts the non-quantized weights (norms, embeddings, head) to fp32 for stable training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing,
                                                gradient_checkpointing_kwargs=checkpointing_kwargs)
    elif checkpointing:
        # sharded QLoRA keeps one dtype (no fp32 upcast), so it enables checkpointing directly
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing_kwargs)
    return model


def lora_config(spec: TrainSpec):
    from peft import LoraConfig

    lora = spec.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def make_optimizer(model, spec: TrainSpec, accelerator: Accelerator) -> torch.optim.Optimizer:
    """AdamW over the trainable weights; DeepSpeed's CPU Adam when ZeRO offloads the optimizer (DeepSpeed
    refuses a torch optimizer there; its CPU Adam is an op it compiles on first use)."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = {"lr": spec.learning_rate, "weight_decay": spec.weight_decay}
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


def write_outputs(args: TrainerArgs, tokenizer, result: dict, history: list[dict], dtype: torch.dtype) -> dict:
    """The main process's end of a training: the adapter merged into the base (LoRA methods; the adapter, or the
    full model in ``merged/``, already saved), the loss curve, the model cards, the checkpoints removed and
    ``result.json`` written last (what the training stage reads back: whole or not at all)."""
    out = Path(args.output_dir)
    adapter_dir, merged_dir = out / "adapter", out / "merged"
    if args.train.method != "full":
        merge_and_save(args.base_model, adapter_dir, merged_dir, tokenizer, dtype)
        result["adapter_path"] = str(adapter_dir)
    plot_loss(history, out / "loss_curve.png")
    last_train: dict = next((h for h in reversed(history) if "train_loss" in h), {})
    last_val: dict = next((h for h in reversed(history) if "val_loss" in h), {})
    result.update(merged_path=str(merged_dir), loss_curve=str(out / "loss_curve.png"),
                  metrics={**result.get("metrics", {}), "train_loss": last_train.get("train_loss", math.nan),
                           "val_loss": last_val.get("val_loss", math.nan), "train_duration_s": result["duration_s"]},
                  history=history)
    for kind, folder in (("adapter", adapter_dir), ("merged", merged_dir)):
        if folder.exists():
            write_text(folder / "README.md", model_card(args, result, kind))
    shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    write_json(out / "result.json", result)
    return result
