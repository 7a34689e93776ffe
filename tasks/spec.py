"""The run configuration: pydantic models that validate a YAML file once, at the edge.

``load_spec`` reads a config, applies ``--set a.b=v`` overrides, validates everything (unknown keys
are errors) and, if anything is wrong, raises :class:`SpecError` listing every problem with its YAML
path and a hint. No Prefect, MLflow or torch import happens here, so validation is instant.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.state import PROJECT_ROOT, sha256_json
from tasks.suites import check_suite, load_catalog, task_problems


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def require_unique(names: list[str], what: str, fix: str) -> None:
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{what} name(s) {twice} used more than once; {fix}")


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------

SOURCE_SCHEMES = ("demo://", "hf://", "modelscope://", "file://", "s3://", "gs://")
REGISTRY_SCHEME = "models:/"
REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@\s]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))$")


def check_source_scheme(v: str) -> None:
    """ValueError naming the accepted forms when ``v`` is neither a known scheme, a registry URI nor a path."""
    if v.startswith(REGISTRY_SCHEME):
        if not REGISTRY_URI.match(v):
            raise ValueError(f"registry source {v!r} must look like models:/NAME@alias or models:/NAME/VERSION")
    elif "://" in v and not v.startswith(SOURCE_SCHEMES):
        raise ValueError(f"unsupported scheme in {v!r}; use one of {', '.join(SOURCE_SCHEMES)}, "
                         f"{REGISTRY_SCHEME}NAME@alias or a local path")


class ModelSpec(Strict):
    """A model: ``demo://tiny-llama`` (built locally), ``hf://org/name@revision``,
    ``modelscope://org/name@revision``, ``s3://…``/``gs://…``, ``models:/NAME@alias`` or
    ``models:/NAME/VERSION`` (the MLflow Model Registry), or a local directory."""

    source: str
    revision: str | None = Field(None, description="hub revision (commit sha or tag); '@rev' in source also works")
    trust_remote_code: bool = False

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str, info: ValidationInfo) -> str:
        check_source_scheme(v)
        if "://" not in v and not v.startswith(REGISTRY_SCHEME):
            path = _resolve(v, info)
            if not path.exists():
                raise ValueError(f"local model directory {str(path)!r} does not exist")
        return v


class DataChecksSpec(Strict):
    """Checks on the pulled data before any training (tasks/checks.py)."""

    max_duplicate_rate: float = Field(0.2, ge=0, le=1)
    max_prompt_tokens_p95: int | None = Field(None, gt=0, description="default: train.max_seq_len")
    max_contamination_rate: float = Field(0.0, ge=0, le=1,
                                          description="fraction of eval items found in the training data")


class DataSpec(Strict):
    """Versioned data: paths of DVC-tracked JSONL files, relative to the DVC repo root."""

    repo: str = Field(".", description="DVC repository root, relative to the project root")
    train: str
    validation: str
    eval: str | None = Field(None, description="evaluation items produced by the same data version (optional)")
    reproducible: bool = Field(True, description="reproduce the DVC stage when the remote lacks the data")
    remote: str | None = Field(None, description="DVC remote name (default: the repo's default remote)")
    required_fields: tuple[str, ...] | None = Field(
        None, description="string fields every train/validation row must have; default: by the file's layout "
                          "(alpaca: instruction, input, output; chat: a messages/conversations list of turns)")
    max_row_bytes: int = Field(1 << 20, gt=0, description="a longer JSONL row is an error, not a memory spike")
    checks: DataChecksSpec = DataChecksSpec()

    @field_validator("train", "validation", "eval")
    @classmethod
    def _tracked(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        repo = _resolve(info.data.get("repo", "."), info)
        if not (repo / v).exists() and not dvc_produces(repo, v):
            raise ValueError(
                f"{v!r} does not exist under {str(repo)!r} and no dvc.yaml stage or .dvc file produces it"
            )
        return v


class LoraSpec(Strict):
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class AccelerateSpec(Strict):
    profile: str | None = Field(None, description="name of a config in deployments/accelerate/ (None: plain launch)")
    num_processes: int = Field(1, gt=0)
    num_machines: int = Field(1, gt=0)
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
    memory_check: Literal["refuse", "warn", "off"] = Field(
        "refuse", description="before launching, compare the planner's memory estimate with the visible devices")


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

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Fill bits, group size and name from the method, so equal variants dump (and cache) equally."""
        if not isinstance(data, dict) or data.get("method") not in QUANT_BITS:
            return data
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
    def _supported(self) -> "QuantizeVariant":
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
        require_unique([x.name for x in v], "variant", "give each variant its own `name`")
        return v


class SpeedProbeSpec(Strict):
    enabled: bool = True
    prompts: int = Field(4, gt=0)
    max_new_tokens: int = Field(16, gt=0)
    large_batch: int = Field(8, gt=0, description="batch size of the throughput measurement (64 on a GPU)")


class EvalTaskSpec(Strict):
    """One task of an evaluation, with its own settings (unset: the suite's or the eval section's)."""

    name: str = Field(..., min_length=1)
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | None = Field(None, gt=0)
    max_gen_tokens: int | None = Field(None, gt=0)


class EvalSpec(Strict):
    tasks_dir: str = "evals"
    suite: str | None = Field(None, description="a suite in <tasks_dir>/suites.yaml (en-core, zh-core, reasoning, …)")
    fixtures: bool = Field(False, description="run each task on its small offline fixture instead of the real data")
    tasks: list[str | EvalTaskSpec] = Field(
        default_factory=list, validate_default=True,
        description="task names (suites.yaml or task YAMLs in tasks_dir), added to the suite")
    backend: Literal["hf", "vllm"] = "hf"
    num_fewshot: int | None = Field(None, ge=0, description="few-shot count for every task (None: each task's default)")
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    fewshot_seed: int = 1234
    apply_chat_template: bool = False
    max_gen_tokens: int | None = Field(None, gt=0, description="generation budget of every generate-until task "
                                                                "(None: each task's default, else 32)")
    compare_with_base: bool = Field(True, description="also evaluate the base model, for the summary")
    speed_probe: SpeedProbeSpec = SpeedProbeSpec()
    tensor_parallel_size: int = Field(1, gt=0, description="vllm backend: GPUs one model is split across")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm backend: share of GPU memory it may take")
    max_model_len: int | None = Field(None, gt=0, description="vllm backend: context length (None: the model's)")

    @field_validator("suite")
    @classmethod
    def _suite_exists(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            check_suite(v, _resolve(info.data.get("tasks_dir", "evals"), info))
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks_exist(cls, v: list[str | EvalTaskSpec], info: ValidationInfo) -> list[str | EvalTaskSpec]:
        if "suite" not in info.data:
            return v  # the suite is invalid: reported on its own
        if not v and not info.data["suite"]:
            raise ValueError("no eval tasks: name a suite (eval.suite) or list tasks (eval.tasks)")
        tasks_dir = _resolve(info.data.get("tasks_dir", "evals"), info)
        suite_tasks = load_catalog(tasks_dir).suites[info.data["suite"]].tasks if info.data["suite"] else []
        names = suite_tasks + [t if isinstance(t, str) else t.name for t in v]
        problems = task_problems(names, bool(info.data.get("fixtures")), tasks_dir)
        if problems:
            raise ValueError("; ".join(problems))
        return v


class PerfCeilings(Strict):
    """Upper limits on what the speed probe measured (names as in EvalReport.perf); None: no limit.
    A ceiling set while the report has no speed probe fails the gate."""

    first_token_latency_ms: float | None = Field(None, gt=0)
    peak_memory_gb: float | None = Field(None, gt=0)
    size_on_disk_gb: float | None = Field(None, gt=0)


class GateSpec(Strict):
    metric: str = Field("acc", description="the metric of each task that the gate reads")
    min_scores: dict[str, float] = Field(default_factory=dict, description="task -> minimum score")
    min_average: float | None = Field(None, description="minimum mean of `metric` over the report's tasks")
    max_regression: float = Field(0.0, ge=0, description="largest allowed drop against the champion, per task, "
                                                          "in the metric's own units (acc 0.02 = 2 points)")
    max_regression_by_task: dict[str, float] = Field(default_factory=dict,
                                                     description="task -> its own max_regression")
    required_tasks: list[str] = Field(default_factory=list,
                                      description="tasks that must have a score; a missing one fails the gate")
    ceilings: PerfCeilings = PerfCeilings()
    min_gain_over_base: float | None = Field(None, description="require the fine-tuned model to beat its base by this")
    register_variants: list[str] = Field(
        default_factory=list, description="quantize.variants names that may be registered (as <model_name>-<variant>) "
                                          "when they pass the same rules as the fine-tuned model")

    @field_validator("max_regression_by_task")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        negative = {task: limit for task, limit in v.items() if limit < 0}
        if negative:
            raise ValueError(f"allowed regressions must be >= 0; got {negative}")
        return v


class RegistrySpec(Strict):
    model_name: str = Field(..., min_length=1)
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"
    lock_timeout_s: float = Field(300.0, gt=0, description="how long a promotion waits for another one to finish")


NOTIFY_EVENTS = ("promoted", "gate_failed", "run_failed")


class WebhookSpec(Strict):
    """One webhook. Its URL is a secret: it comes from an environment variable or a Prefect Secret
    block, never from the config, and is never logged."""

    url_env: str | None = Field(None, description="name of the environment variable holding the URL")
    secret_block: str | None = Field(None, description="name of a Prefect Secret block holding the URL")
    format: Literal["slack", "dingtalk", "feishu"] = "slack"
    events: list[Literal["promoted", "gate_failed", "run_failed"]] = list(NOTIFY_EVENTS)

    @model_validator(mode="after")
    def _one_source(self) -> "WebhookSpec":
        if (self.url_env is None) == (self.secret_block is None):
            raise ValueError("set exactly one of url_env (an environment variable name) or secret_block "
                             "(a Prefect Secret block name); webhook URLs never go in the config")
        return self


class NotifySpec(Strict):
    webhooks: list[WebhookSpec] = []
    timeout_s: float = Field(10.0, gt=0)
    mlflow_ui_url: str | None = Field(None, description="MLflow UI base URL for links "
                                                        "(default: the tracking URI when it is http(s))")
    prefect_ui_url: str | None = Field(None, description="Prefect UI base URL for links (default: PREFECT_UI_URL)")


class TrackingSpec(Strict):
    experiment: str = "gauntlet"
    tracking_uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI or sqlite in $GAUNTLET_HOME")


class RunSpec(Strict):
    name: str = Field(..., min_length=1)
    model: ModelSpec
    data: DataSpec
    train: TrainSpec = TrainSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    eval: EvalSpec
    gate: GateSpec = GateSpec()
    registry: RegistrySpec
    tracking: TrackingSpec = TrackingSpec()
    notify: NotifySpec = NotifySpec()

    def section_hash(self, section: str) -> str:
        return sha256_json(getattr(self, section).model_dump(mode="json"))

    def config_hash(self) -> str:
        return sha256_json(self.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------
# the leaderboard config (configs/leaderboard.yaml)
# ---------------------------------------------------------------------------------------------

# A leaderboard variant name -> how the candidate is turned into it (None: evaluated as stored, unquantized).
LEADERBOARD_VARIANTS: dict[str, QuantizeVariant | None] = {
    "bf16": None,                     # as stored; the hf backend loads dtype=auto on a GPU, float32 on the CPU
    "gptq-int4": QuantizeVariant(method="gptq", bits=4),
    "gptq-int8": QuantizeVariant(method="gptq", bits=8),
    "awq-int4": QuantizeVariant(method="awq", bits=4),
    "bnb-nf4": QuantizeVariant(method="bnb-nf4", bits=4),
    "bnb-int8": QuantizeVariant(method="bnb-int8", bits=8),
}

# Rank keys besides averages and single tasks, with their direction (True: higher is better).
PERF_RANK_KEYS: dict[str, bool] = {"tokens_per_s": True, "first_token_latency_ms": False,
                                   "peak_memory_gb": False, "size_on_disk_gb": False}


def _known_variants(v: list[str] | None) -> list[str] | None:
    unknown = [x for x in v or [] if x not in LEADERBOARD_VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; known: {list(LEADERBOARD_VARIANTS)}")
    if v is not None and len(set(v)) != len(v):
        raise ValueError(f"variants listed twice in {v}")
    return v


class LeaderboardCandidate(Strict):
    """One model on the leaderboard: ``hf://org/name@rev``, a local directory, ``demo://tiny-llama``,
    ``s3://…`` or ``models:/NAME@alias`` / ``models:/NAME/VERSION`` (the MLflow Model Registry).

    Availability (a local folder that exists, a registry alias that is set) is checked when the
    leaderboard runs: a missing candidate fails on its own row and does not stop the others."""

    source: str
    name: str | None = Field(None, description="display name (default: derived from the source)")
    revision: str | None = Field(None, description="hub revision; '@rev' in source also works")
    trust_remote_code: bool = False
    variants: list[str] | None = Field(None, description="variants of this candidate (default: the top-level list)")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        check_source_scheme(v)
        return v

    @field_validator("variants")
    @classmethod
    def _variants_known(cls, v: list[str] | None) -> list[str] | None:
        return _known_variants(v)

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.source.startswith(REGISTRY_SCHEME):
            return self.source.removeprefix(REGISTRY_SCHEME)
        if "://" in self.source:
            rest = self.source.split("://", 1)[1]
            return rest + (f"@{self.revision[:12]}" if self.revision else "")
        return Path(self.source).name or self.source


class RankingSpec(Strict):
    key: str = Field("average", description="average | suite:<name> | task:<name> | "
                                            + " | ".join(PERF_RANK_KEYS))
    metric: str = Field("acc", description="the metric read from every task (acc, acc_norm, exact_match, …)")
    task_metrics: dict[str, str] = Field(default_factory=dict, description="task -> metric, where it differs")
    suites: dict[str, list[str]] = Field(default_factory=dict, description="suite name -> tasks averaged together")
    tie_decimals: int = Field(2, ge=0, le=6, description="rank keys equal at this many decimals tie")


class PublishSpec(Strict):
    dir: str | None = Field(None, description="where leaderboard.{json,md,html} go (default: "
                                              "$GAUNTLET_HOME/leaderboard/<name>)")
    history_nights: int = Field(14, gt=0, description="past nights shown in trends (read from MLflow)")
    title: str | None = None


class ConcurrencySpec(Strict):
    gpu_tag: str = Field("gpu", min_length=1, description="Prefect tag on GPU tasks (evaluate, quantize)")
    gpu_slots: int = Field(1, gt=0, description="tag concurrency limit created when none exists")


class LeaderboardSpec(Strict):
    name: str = Field("nightly", min_length=1, pattern=r"^[a-z0-9][a-z0-9-]*$")
    candidates: list[LeaderboardCandidate] = Field(..., min_length=1)
    variants: list[str] = ["bf16"]
    data: DataSpec | None = Field(None, description="DVC data whose eval file the tasks read")
    eval_file: str | None = Field(None, description="or: a plain JSONL file of eval items (hashed, not DVC)")
    calibration: CalibrationSpec = Field(CalibrationSpec(), description="rows of data.train that calibrate "
                                                                       "the GPTQ/AWQ variants")
    eval: EvalSpec
    ranking: RankingSpec = RankingSpec()
    publish: PublishSpec = PublishSpec()
    concurrency: ConcurrencySpec = ConcurrencySpec()
    tracking: TrackingSpec = TrackingSpec(experiment="leaderboard")

    @field_validator("variants")
    @classmethod
    def _variants_known(cls, v: list[str] | None) -> list[str] | None:
        return _known_variants(v)

    @field_validator("candidates")
    @classmethod
    def _unique_names(cls, v: list[LeaderboardCandidate]) -> list[LeaderboardCandidate]:
        require_unique([c.display_name for c in v], "candidate", "give each a distinct `name:`")
        return v

    @field_validator("eval_file")
    @classmethod
    def _eval_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if info.data.get("data") is not None:
            raise ValueError("give either data (DVC) or eval_file, not both")
        if not _resolve(v, info).is_file():
            raise ValueError(f"eval file {str(_resolve(v, info))!r} does not exist")
        return v

    @field_validator("ranking")
    @classmethod
    def _ranking_names_tasks(cls, v: RankingSpec, info: ValidationInfo) -> RankingSpec:
        ev = info.data.get("eval")
        if ev is None:
            return v  # eval itself is invalid; that error is reported
        tasks = set(ev.tasks)
        problems = [f"suite {s!r} names task(s) {sorted(set(ts) - tasks)} not in eval.tasks"
                    for s, ts in v.suites.items() if set(ts) - tasks or not ts]
        problems += [f"task_metrics names {t!r}, not in eval.tasks" for t in v.task_metrics if t not in tasks]
        key = v.key
        ok = (key == "average" or key in PERF_RANK_KEYS
              or (key.startswith("suite:") and key[6:] in v.suites)
              or (key.startswith("task:") and key[5:] in tasks))
        if not ok:
            problems.append(f"key {key!r} is not one of: average, {', '.join('suite:' + s for s in v.suites)}"
                            f"{', ' if v.suites else ''}{', '.join('task:' + t for t in sorted(tasks))}, "
                            f"{', '.join(PERF_RANK_KEYS)}")
        if problems:
            raise ValueError("; ".join(problems))
        return v


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


class SpecProblem(BaseModel):
    path: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        return f"  {self.path}: {self.message}" + (f"\n      hint: {self.hint}" if self.hint else "")


class SpecError(Exception):
    """An invalid config; ``problems`` lists each one with its YAML path."""

    def __init__(self, source: str, problems: list[SpecProblem]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"] + [str(p) for p in problems]
        super().__init__("\n".join(lines))


def _resolve(path: str, info: ValidationInfo) -> Path:
    root = Path((info.context or {}).get("root", PROJECT_ROOT))
    p = Path(path)
    return p if p.is_absolute() else root / p


def dvc_produces(repo: Path, path: str) -> bool:
    """True when ``path`` is an output of a stage in ``repo/dvc.yaml`` or has a ``.dvc`` file."""
    if (repo / f"{path}.dvc").exists():
        return True
    dvc_yaml = repo / "dvc.yaml"
    if not dvc_yaml.exists():
        return False
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    for stage in stages.values():
        for out in stage.get("outs", []):
            out_path = next(iter(out)) if isinstance(out, dict) else out
            if path == out_path or path.startswith(out_path.rstrip("/") + "/"):
                return True
    return False


def _fields_of(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names valid at ``loc`` (for 'did you mean')."""
    current: Any = model
    for part in loc:
        if part.isdigit():
            continue  # an index into a list of sections (leaderboard candidates)
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        inner = [a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)]  # list[X], X | None
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else (inner[0] if inner else None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


# Hints for the checks our own validators make (pydantic's built-in errors get generic hints below).
FIELD_HINTS = {
    "model.source": "use demo://tiny-llama, hf://org/name@revision, or a folder saved with save_pretrained()",
    "data.train": "`dvc add` the file or list it in a dvc.yaml stage's outs, or fix the path",
    "data.validation": "`dvc add` the file or list it in a dvc.yaml stage's outs, or fix the path",
    "data.eval": "`dvc add` the file or list it in a dvc.yaml stage's outs, or fix the path",
    "eval.tasks": "add evals/<task>.yaml (an lm-eval task YAML) or use one of the listed tasks",
}


# Keys that moved: the error says where they live now.
MOVED_KEYS = {
    "ranking.random_baselines": "random baselines are part of the evaluation protocol now: declare "
                                "`random_baseline` in evals/suites.yaml or as metadata.random_baseline in the task "
                                "YAML (left out, multiple-choice tasks use the mean of 1/choices over their items)",
}


def _hint(err: dict, schema: type[BaseModel] = RunSpec) -> str:
    loc = tuple(str(x) for x in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden" and ".".join(loc) in MOVED_KEYS:
        return MOVED_KEYS[".".join(loc)]
    if kind == "value_error" and ".".join(loc) in FIELD_HINTS:
        return FIELD_HINTS[".".join(loc)]
    if kind == "extra_forbidden":
        options = _fields_of(schema, loc[:-1])
        close = difflib.get_close_matches(loc[-1], options, n=1)
        return (f"did you mean {close[0]!r}? " if close else "") + f"valid keys here: {', '.join(options)}"
    if kind == "missing":
        return "add this key"
    if kind.endswith("_parsing") or kind.endswith("_type"):
        return f"got {err.get('input')!r}; expected {kind.split('_')[0]}"
    if kind in ("greater_than", "greater_than_equal", "less_than"):
        return f"got {err.get('input')!r}"
    if kind == "literal_error":
        return f"got {err.get('input')!r}"
    return ""


def problems_from(error: ValidationError, schema: type[BaseModel] = RunSpec) -> list[SpecProblem]:
    out = []
    for err in error.errors():
        path = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        out.append(SpecProblem(path=path, message=msg, hint=_hint(err, schema)))
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides; the value is parsed as YAML (``1e-3`` → float)."""
    for item in overrides:
        if "=" not in item:
            raise SpecError("--set", [SpecProblem(path=item, message="override must look like a.b=value")])
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError("--set", [SpecProblem(path=key, message=f"{part!r} is not a section")])
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_spec(path: str | Path, overrides: list[str] | None = None, root: Path | None = None,
              schema: type[BaseModel] = RunSpec) -> Any:
    """Read, override and validate a run config (or another ``schema``). Raises SpecError listing every problem."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise SpecError(source, [SpecProblem(path="(file)", message="config file not found", hint="check the path")])
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SpecError(source, [SpecProblem(path="(file)", message=f"not UTF-8 text: {e}", hint="save as UTF-8")])
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise SpecError(source, [SpecProblem(path=where, message=f"malformed YAML: {getattr(e, 'problem', e)}",
                                             hint="check indentation and quoting near that line")])
    if not isinstance(raw, dict):
        raise SpecError(source, [SpecProblem(path="(top level)", message="config must be a mapping of sections")])
    raw = apply_overrides(raw, overrides or [])
    try:
        spec = schema.model_validate(raw, context={"root": root or PROJECT_ROOT})
    except ValidationError as e:
        raise SpecError(source, problems_from(e, schema)) from None
    problems = cross_section_problems(spec, root or PROJECT_ROOT) if isinstance(spec, RunSpec) else []
    if problems:
        raise SpecError(source, problems)
    return spec


def load_leaderboard_spec(path: str | Path, overrides: list[str] | None = None,
                          root: Path | None = None) -> LeaderboardSpec:
    """Read, override and validate a leaderboard config (configs/leaderboard.yaml)."""
    return load_spec(path, overrides, root, schema=LeaderboardSpec)


def count_rows(path: Path) -> int:
    """Non-blank lines of a JSON Lines file."""
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def cross_section_problems(spec: RunSpec, root: Path) -> list[SpecProblem]:
    """Rules that relate two sections (checked after each section is valid on its own)."""
    problems = []
    names = [v.name for v in spec.quantize.variants]
    unknown = [n for n in spec.gate.register_variants if n not in names]
    if unknown:
        problems.append(SpecProblem(path="gate.register_variants", message=f"no quantize variant named {unknown}",
                                    hint=f"variants defined in quantize.variants: {names}"))
    calibrated = [v.name for v in spec.quantize.variants if v.calibrated]
    train = Path(root) / spec.data.repo / spec.data.train
    # The data is usually pulled later; when it is already here, a too-small file fails now, not after training.
    if calibrated and train.is_file():
        rows = count_rows(train)
        wanted = spec.quantize.calibration.samples
        if rows < wanted:
            problems.append(SpecProblem(
                path="quantize.calibration.samples",
                message=f"{wanted} calibration samples asked for {calibrated}, but {spec.data.train} has {rows} rows",
                hint=f"set quantize.calibration.samples to at most {rows}"))
    return problems
