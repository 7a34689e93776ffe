"""The ``eval:`` section: suites and tasks, backend, protocol settings and the speed probe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gauntlet.config.base import Strict, resolve
from gauntlet.config.judge import JudgeSpec
from gauntlet.eval.suites import check_suite, load_catalog, task_problems


class SpeedProbeSpec(Strict):
    enabled: bool = True
    prompts: int = Field(4, gt=0)
    max_new_tokens: int = Field(16, gt=0)
    large_batch: int = Field(8, gt=0, description="batch size of the throughput measurement (64 on a GPU)")


class PerplexitySpec(Strict):
    """Byte perplexity on the run's held-out rows (gauntlet/eval/perplexity.py), gated by
    gate.max_perplexity_increase against the base model."""

    split: Literal["validation", "eval"] = Field("validation", description="which of the run's files: data.validation "
                                                                           "(held out from training) or data.eval")
    text: Literal["response", "full"] = Field(
        "response", description="response: the response given its prompt (what fine-tuning learns; lm-eval "
                                "loglikelihood); full: the whole row (lm-eval loglikelihood_rolling)")
    limit: int | None = Field(None, gt=0, description="score the first N rows only")


class SafetySpec(Strict):
    """Harmful compliance and over-refusal, judged by eval.judge with a rubric (gauntlet/eval/safety.py); gated
    by gate.max_harmful_rate and gate.max_over_refusal_rate."""

    harmful: str = Field("evals/safety/harmful.jsonl", description="harmful requests (JSONL rows with `instruction`)")
    benign: str = Field("evals/safety/benign.jsonl", description="benign requests that sound edgy (over-refusal)")
    rubric: str = Field("evals/safety/rubric.md", description="the judge's rubric (its sha256 is in the protocol)")
    limit: int | None = Field(None, gt=0, description="the first N requests of each set")
    max_new_tokens: int = Field(64, gt=0, description="the candidate's answer length (greedy)")

    @field_validator("harmful", "benign", "rubric")
    @classmethod
    def _file_exists(cls, v: str, info: ValidationInfo) -> str:
        assert info.field_name is not None   # a field validator always names its field
        if not resolve(v, info).is_file():
            raise ValueError(f"{v!r} does not exist. Fix: point eval.safety.{info.field_name} at a file, e.g. the "
                             f"shipped {SafetySpec.model_fields[info.field_name].default}")
        return v


class EvalTaskSpec(Strict):
    """One task of an evaluation, with its own settings (unset: the suite's or the eval section's)."""

    name: str = Field(..., min_length=1)
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, gt=0)
    max_gen_tokens: int | None = Field(None, gt=0)


def task_names(tasks: list[str | EvalTaskSpec]) -> list[str]:
    """The names of eval.tasks, whether listed as names or with their own settings."""
    return [t if isinstance(t, str) else t.name for t in tasks]


class EvalSpec(Strict):
    tasks_dir: str = "evals"
    suite: str | None = Field(None, description="a suite in <tasks_dir>/suites.yaml (en-core, zh-core, reasoning, …)")
    fixtures: bool = Field(False, description="run each task on its small offline fixture instead of the real data")
    tasks: list[str | EvalTaskSpec] = Field(
        default_factory=list, validate_default=True,
        description="task names (suites.yaml or task YAMLs in tasks_dir), added to the suite")
    backend: Literal["hf", "vllm"] = "hf"
    num_fewshot: int | None = Field(None, ge=0, description="few-shot count for every task (None: each task's own: "
                                                            "suites.yaml's, else its YAML's)")
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    fewshot_seed: int = 1234
    apply_chat_template: bool = False
    max_gen_tokens: int | None = Field(None, gt=0, description="generation budget of every generate-until task "
                                                                "(None: each task's own: suites.yaml's, else "
                                                                "its YAML's max_gen_toks)")
    temperature: float | None = Field(None, ge=0, description="None: each task's own decoding (greedy in the "
                                                              "shipped tasks); 0: greedy; above 0: sampled")
    repeats: int = Field(1, ge=1, le=20, description="run each task this many times with distinct seeds "
                                                     "(fewshot_seed, +1, …): sampled decoding reports the mean ± sd; "
                                                     "greedy decoding checks determinism")
    compare_with_base: bool = Field(True, description="also evaluate the base model, for the summary")
    speed_probe: SpeedProbeSpec = SpeedProbeSpec()
    tensor_parallel_size: int = Field(1, gt=0, description="vllm backend: GPUs one model is split across")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm backend: share of GPU memory it may take")
    max_model_len: int | None = Field(None, gt=0, description="vllm backend: context length (None: the model's)")
    perplexity: PerplexitySpec | None = Field(None, description="byte perplexity on the run's held-out rows "
                                                                "(data.validation), base against fine-tuned")
    # exclude: a time limit changes no result, so it is no part of the protocol or the cache key
    timeout_minutes: float | None = Field(None, gt=0, exclude=True,
                                          description="stop a task's scoring of one model (all its repeats) past "
                                                      "this; checked before each batch the model runs")
    judge: JudgeSpec | None = Field(None, description="pairwise LLM judge of the candidate against the champion "
                                                      "(or the base): win rate, gated by gate.min_win_rate")
    safety: SafetySpec | None = Field(None, description="harmful-compliance and over-refusal rates, judged by "
                                                        "eval.judge with a rubric")

    @field_validator("suite")
    @classmethod
    def _suite_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            check_suite(v, resolve(info.data.get("tasks_dir", "evals"), info))
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks_exist(cls, v: list[str | EvalTaskSpec], info: ValidationInfo) -> list[str | EvalTaskSpec]:
        if "suite" not in info.data:
            return v  # the suite is invalid: reported on its own
        if not v and not info.data["suite"]:
            raise ValueError("no eval tasks: name a suite (eval.suite) or list tasks (eval.tasks)")
        tasks_dir = resolve(info.data.get("tasks_dir", "evals"), info)
        suite_tasks = load_catalog(tasks_dir).suites[info.data["suite"]].tasks if info.data["suite"] else []
        names = suite_tasks + task_names(v)
        problems = task_problems(names, bool(info.data.get("fixtures")), tasks_dir)
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="after")
    def _safety_needs_a_judge(self) -> EvalSpec:
        if self.safety is not None and self.judge is None:
            raise ValueError("eval.safety is judged by eval.judge, which is not set. Fix: configure eval.judge (a "
                             "model or an endpoint), or remove eval.safety")
        return self
