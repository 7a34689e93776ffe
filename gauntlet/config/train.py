"""The ``train:`` section: objective, method, hyper-parameters, LoRA and the accelerate launch profile.

``objective`` picks what is learned (``sft``: responses; a preference objective: chosen over rejected, on TRL's
trainers), ``method`` how (the adapter: ``qlora | lora | full``). A preference objective's settings live in
``train.preference``; each one applies to some objectives only, and one that does not apply is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gauntlet.config.base import Strict
from gauntlet.config.data import DataSpec
from gauntlet.config.model import check_source_scheme
from gauntlet.config.problems import SpecProblem


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


Objective = Literal["sft", "dpo", "ipo", "simpo", "orpo", "kto"]
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "simpo", "orpo", "kto")
# TRL's loss types that each objective takes (train.preference.loss_type); ipo, simpo and orpo are one loss each
LOSS_TYPES: dict[str, tuple[str, ...]] = {
    "dpo": ("sigmoid", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
            "apo_zero", "apo_down", "discopop", "sigmoid_norm"),
    "kto": ("kto", "apo_zero_unpaired"),
}
# TRL's own defaults per objective (SimPO's paper: beta 2.0, gamma 0.5)
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}
REFERENCE_FREE = ("simpo", "orpo")
# which objectives each setting of train.preference applies to (None: all of them)
APPLIES_TO: dict[str, tuple[str, ...]] = {
    "loss_type": tuple(LOSS_TYPES),
    "simpo_gamma": ("simpo",),
    "max_completion_length": ("simpo", "orpo"),
    "reference": ("dpo", "ipo", "kto"),
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
}


# train: settings of the SFT program that a preference objective has no use for (with their defaults)
SFT_ONLY: dict[str, object] = {"packing": False, "data_format": "auto"}


class PreferenceSpec(Strict):
    """Settings of a preference objective (``train.objective`` other than ``sft``); None: TRL's default for it."""

    beta: float | None = Field(None, gt=0, description="strength of the tie to the reference (DPO, IPO's tau, "
                                                      "KTO), SimPO's reward scale, ORPO's odds-ratio weight")
    loss_type: str | None = Field(None, description="dpo: one of TRL's DPO losses; kto: kto | apo_zero_unpaired")
    simpo_gamma: float | None = Field(None, ge=0, description="SimPO's target reward margin")
    max_completion_length: int | None = Field(None, gt=0, description="tokens of a completion kept (simpo, orpo); "
                                                                      "the whole row is train.max_seq_len")
    reference: str = Field("base", description="the reference model: 'base' (under LoRA/QLoRA the base with the "
                                               "adapter disabled, no second copy) or a model source")
    desirable_weight: float | None = Field(None, gt=0, description="KTO: weight of the desirable rows' loss")
    undesirable_weight: float | None = Field(None, gt=0, description="KTO: weight of the undesirable rows' loss")

    @field_validator("reference")
    @classmethod
    def _reference_source(cls, v: str) -> str:
        if v != "base":
            check_source_scheme(v)
        return v

    def given(self) -> list[str]:
        """The settings written in the config (not left at None / 'base')."""
        return [k for k, v in self.model_dump().items() if v is not None and not (k == "reference" and v == "base")]


def preference_problems(objective: str, pref: PreferenceSpec | None) -> list[str]:
    """Why ``pref`` does not fit ``objective`` (each naming its field and the fix); empty when it does."""
    if objective == "sft":
        return [] if pref is None else [
            "train.preference is set, but train.objective is sft, which has no preference settings. Fix: set "
            f"train.objective to one of {', '.join(PREFERENCE_OBJECTIVES)}, or remove train.preference"]
    if pref is None:
        return []
    problems = [f"train.preference.{k} does not apply to objective {objective} (it applies to "
                f"{', '.join(APPLIES_TO[k])}). Fix: remove it" for k in pref.given()
                if k in APPLIES_TO and objective not in APPLIES_TO[k]]
    allowed = LOSS_TYPES.get(objective, ())
    if pref.loss_type is not None and allowed and pref.loss_type not in allowed:
        problems.append(f"train.preference.loss_type {pref.loss_type!r} is not a {objective} loss of TRL. Fix: use "
                        f"one of {', '.join(allowed)}")
    return problems


class TrainSpec(Strict):
    objective: Objective = Field("sft", description="sft: learn the responses; dpo, ipo, simpo, orpo, kto: learn a "
                                                    "preference (TRL's trainers; rows {prompt, chosen, rejected}, "
                                                    "kto: {prompt, completion, label})")
    preference: PreferenceSpec | None = Field(None, description="settings of a preference objective")
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

    @field_validator("preference")
    @classmethod
    def _fits_objective(cls, v: PreferenceSpec | None, info: ValidationInfo) -> PreferenceSpec | None:
        if "objective" in info.data:   # a bad objective is reported on its own
            problems = preference_problems(info.data["objective"], v)
            if problems:
                raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _sft_settings_under_sft(self) -> TrainSpec:
        """SFT's own row settings mean nothing to TRL's preference trainers: refused, not silently ignored."""
        if self.is_preference:
            given = [k for k, default in SFT_ONLY.items() if getattr(self, k) != default]
            if given:
                raise ValueError(f"train.{', train.'.join(given)} apply to objective sft only (TRL's {self.objective} "
                                 "trainer reads the rows itself, unpacked). Fix: remove "
                                 + ("them" if len(given) > 1 else "it"))
        return self

    @property
    def is_preference(self) -> bool:
        return self.objective != "sft"

    def preference_settings(self) -> PreferenceSpec:
        """train.preference with every None filled with the objective's default."""
        pref = self.preference or PreferenceSpec()
        return pref.model_copy(update={"beta": pref.beta if pref.beta is not None
                                       else DEFAULT_BETA.get(self.objective, 0.1)})


def data_layout_problems(train: TrainSpec, data: DataSpec, root: Path) -> list[SpecProblem]:
    """Training files (when already here: they are usually pulled later, and the training stage checks them again)
    whose rows the objective cannot train on: SFT rows under a preference objective, or preference rows under sft,
    naming the fields each needs."""
    import json

    from gauntlet.data.preference import detect_layout, layout_mismatch

    problems = []
    for role in ("train", "validation"):
        path = Path(root) / data.repo / getattr(data, role)
        try:
            with open(path, encoding="utf-8") as f:
                first = json.loads(next((line for line in f if line.strip()), "null"))
        except (OSError, ValueError):   # absent or unreadable: the data stage names it
            continue
        if isinstance(first, dict) and (why := layout_mismatch(train.objective, detect_layout(first),
                                                                f"data.{role}")):
            message, _, fix = why.partition(" Fix: ")
            problems.append(SpecProblem(path=f"data.{role}", message=message, hint=fix))
    return problems
