"""The ``train:`` section: method, hyper-parameters, LoRA and the accelerate launch profile."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from gauntlet.config.base import Strict


class LoraSpec(Strict):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class AccelerateSpec(Strict):
    profile: str | None = Field(None, description="name of a config in deployments/accelerate/ (None: plain launch)")
    num_processes: int = Field(1, gt=0)
    num_machines: int = Field(1, gt=0)

    @field_validator("num_machines")
    @classmethod
    def _one_machine(cls, v: int) -> int:
        if v > 1:
            raise ValueError(f"num_machines: {v} is not supported: a multi-machine launch needs each machine's rank "
                             "and the main machine's address, which Gauntlet does not hand out. Fix: set "
                             "num_machines: 1 and use num_processes for the GPUs of one machine")
        return v
    cpu: bool | None = Field(None, description="force CPU; None: CPU exactly when CUDA is unavailable")


class TrainSpec(Strict):
    method: Literal["qlora", "lora", "full"] = "qlora"
    learning_rate: float = Field(2e-4, gt=0)
    max_steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    max_seq_len: int = Field(256, gt=8)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0, allow_inf_nan=False,
                                        description="clip the gradients' total norm to this before each optimizer "
                                                    "step (null: no clipping)")
    logging_steps: int = Field(10, gt=0)
    seed: int = 0
    lora: LoraSpec = LoraSpec()
    accelerate: AccelerateSpec = AccelerateSpec()
    data_format: Literal["auto", "alpaca", "chat"] = Field(
        "auto", description="alpaca rows {instruction, input, output}, or chat rows {messages: [{role, content}]} / "
                            "ShareGPT {conversations: [{from, value}]}; auto: from the first row")
    chat_template: str | None = Field(None, description="Jinja chat template for chat rows when the tokenizer has none")
    packing: bool = Field(False, description="pack several examples into each max_seq_len row (attention kept "
                                             "within each example)")
    gradient_checkpointing: bool | None = Field(None, description="recompute activations in the backward pass; "
                                                                  "None: on for GPU runs, off on the CPU")
    eval_steps: int | None = Field(None, gt=0, description="validation loss every N steps (and always at the end)")
    checkpoint_steps: int | None = Field(100, gt=0, description="save a resumable checkpoint every N steps "
                                                                "(None: never)")
    checkpoint_keep: int = Field(2, gt=0, description="how many of the latest checkpoints to keep")
    # exclude: a time limit changes no result, so it is no part of the cache key
    timeout_minutes: float | None = Field(None, gt=0, exclude=True,
                                          description="stop the trainer (its whole process group) past this")
    memory_check: Literal["refuse", "warn", "off"] = Field(
        "refuse", description="before launching, compare the planner's memory estimate with the visible devices")

