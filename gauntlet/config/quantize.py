"""The ``quantize:`` section: GPTQ/AWQ (calibrated) and bitsandbytes variants of the fine-tuned model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from gauntlet.config.base import Strict, require_unique

# Weight bit-widths each method can write (the first is the default). GPTQ/AWQ: llm-compressor's
# integer weight-only schemes that vLLM and transformers load (W4A16, W8A16; AWQ only 4-bit);
# bitsandbytes: NF4 is 4-bit, LLM.int8() is 8-bit.
QUANT_BITS: dict[str, tuple[int, ...]] = {"gptq": (4, 8), "awq": (4,), "bnb-nf4": (4,), "bnb-int8": (8,)}
CALIBRATED_METHODS = ("gptq", "awq")
DEFAULT_GROUP_SIZE = 128


class QuantizeVariant(Strict):
    """One quantized variant of the fine-tuned model: GPTQ or AWQ (llm-compressor, calibrated on the
    run's training data) or bitsandbytes NF4 / INT8 (no calibration)."""

    method: Literal["gptq", "awq", "bnb-nf4", "bnb-int8"]
    bits: int | None = Field(None, gt=0, description="weight bits; default 4 (8 for bnb-int8)")
    group_size: int | None = Field(None, gt=0, description="weights sharing one scale (gptq/awq only; default 128); "
                                                           "must divide the model's hidden and intermediate sizes")
    name: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]*$",
                             description="name in reports and the registry; default like gptq-w4g128")
    # exclude: a time limit changes no result, so it is no part of the cache key
    timeout_minutes: float | None = Field(None, gt=0, exclude=True,
                                          description="stop the quantizer (its whole process group) past this")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Fill bits, group size and name from the method, so equal variants dump (and cache) equally."""
        if not isinstance(data, dict) or not isinstance(data.get("method"), str) or data["method"] not in QUANT_BITS:
            return data   # not a variant yet (a list where the method goes): pydantic names what is wrong
        data = dict(data)
        method = data["method"]
        if data.get("bits") is None:
            data["bits"] = QUANT_BITS[method][0]
        if method in CALIBRATED_METHODS and data.get("group_size") is None:
            data["group_size"] = DEFAULT_GROUP_SIZE
        if data.get("name") is None:
            data["name"] = (f"{method}-w{data['bits']}g{data['group_size']}" if method in CALIBRATED_METHODS
                            else method)
        return data

    @model_validator(mode="after")
    def _supported(self) -> QuantizeVariant:
        supported = QUANT_BITS[self.method]
        if self.bits not in supported:
            raise ValueError(f"{self.method} does not support {self.bits}-bit weights; supported: "
                             f"{', '.join(f'{b}-bit' for b in supported)}")
        if self.method not in CALIBRATED_METHODS and self.group_size is not None:
            raise ValueError(f"{self.method} has no group size (bitsandbytes uses fixed blocks); remove group_size")
        if self.group_size is not None and self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size {self.group_size} is not a power of two; use 32, 64 or 128")
        return self

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED_METHODS


class CalibrationSpec(Strict):
    samples: int = Field(128, gt=0, description="rows of the run's training data that calibrate GPTQ/AWQ")
    max_seq_len: int = Field(512, gt=8, description="tokens per calibration sample (longer rows are truncated)")
    seed: int = Field(0, description="which rows are drawn (a seeded sample of the training file)")


class QuantizeSpec(Strict):
    variants: list[QuantizeVariant] = []
    calibration: CalibrationSpec = CalibrationSpec()

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, v: list[QuantizeVariant]) -> list[QuantizeVariant]:
        # every variant is named by now (the before-validator fills the default name)
        require_unique([x.name for x in v if x.name is not None], "variant", "give each variant its own `name`")
        return v

