"""The run configuration: pydantic models that validate a YAML file once, at the edge.

``load_spec`` reads a config, applies ``--set a.b=v`` overrides, validates everything (unknown keys
are errors) and, if anything is wrong, raises :class:`SpecError` listing every problem with its YAML
path and a hint. No Prefect, MLflow or torch import happens here, so validation is instant.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from tasks.state import PROJECT_ROOT, sha256_json


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------

SOURCE_SCHEMES = ("demo://", "hf://", "modelscope://", "file://", "s3://", "gs://")


class ModelSpec(Strict):
    """The base model: ``demo://tiny-llama`` (built locally), ``hf://org/name@revision``,
    ``modelscope://org/name@revision``, ``s3://…``/``gs://…`` or a local directory."""

    source: str
    revision: str | None = Field(None, description="hub revision (commit sha or tag); '@rev' in source also works")
    trust_remote_code: bool = False

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, v: str, info: ValidationInfo) -> str:
        if "://" in v and not v.startswith(SOURCE_SCHEMES):
            raise ValueError(f"unsupported scheme in {v!r}; use one of {', '.join(SOURCE_SCHEMES)} or a local path")
        if "://" not in v:
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
    required_fields: tuple[str, ...] = ("instruction", "input", "output")
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


class QuantizeVariant(Strict):
    method: Literal["gptq", "awq", "bnb-nf4", "bnb-int8"]
    bits: int = Field(4, gt=0)
    group_size: int = 128


class QuantizeSpec(Strict):
    variants: list[QuantizeVariant] = []


class SpeedProbeSpec(Strict):
    enabled: bool = True
    prompts: int = Field(4, gt=0)
    max_new_tokens: int = Field(16, gt=0)


class EvalSpec(Strict):
    tasks_dir: str = "evals"
    tasks: list[str] = Field(..., min_length=1, description="names of task YAMLs in tasks_dir")
    backend: Literal["hf", "vllm"] = "hf"
    num_fewshot: int = Field(0, ge=0)
    limit: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0)
    fewshot_seed: int = 1234
    apply_chat_template: bool = False
    max_gen_tokens: int = Field(32, gt=0)
    compare_with_base: bool = Field(True, description="also evaluate the base model, for the summary")
    speed_probe: SpeedProbeSpec = SpeedProbeSpec()

    @field_validator("tasks")
    @classmethod
    def _tasks_exist(cls, v: list[str], info: ValidationInfo) -> list[str]:
        tasks_dir = _resolve(info.data.get("tasks_dir", "evals"), info)
        known = sorted(p.stem for p in tasks_dir.rglob("*.yaml")) if tasks_dir.exists() else []
        missing = [t for t in v if t not in known]
        if missing:
            raise ValueError(f"unknown eval task(s) {missing}; task YAMLs in {str(tasks_dir)!r}: {known}")
        return v


class GateSpec(Strict):
    metric: str = Field("acc", description="the metric of each task that the gate reads")
    min_scores: dict[str, float] = Field(default_factory=dict, description="task -> minimum score")
    max_regression: float = Field(0.0, ge=0, description="largest allowed drop against the champion, per task")
    min_gain_over_base: float | None = Field(None, description="require the fine-tuned model to beat its base by this")


class RegistrySpec(Strict):
    model_name: str = Field(..., min_length=1)
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"


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

    def section_hash(self, section: str) -> str:
        return sha256_json(getattr(self, section).model_dump(mode="json"))

    def config_hash(self) -> str:
        return sha256_json(self.model_dump(mode="json"))


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
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
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


def _hint(err: dict) -> str:
    loc = tuple(str(x) for x in err["loc"])
    kind = err["type"]
    if kind == "value_error" and ".".join(loc) in FIELD_HINTS:
        return FIELD_HINTS[".".join(loc)]
    if kind == "extra_forbidden":
        options = _fields_of(RunSpec, loc[:-1])
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


def problems_from(error: ValidationError) -> list[SpecProblem]:
    out = []
    for err in error.errors():
        path = ".".join(str(x) for x in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        out.append(SpecProblem(path=path, message=msg, hint=_hint(err)))
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


def load_spec(path: str | Path, overrides: list[str] | None = None, root: Path | None = None) -> RunSpec:
    """Read, override and validate a run config. Raises SpecError listing every problem."""
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
        return RunSpec.model_validate(raw, context={"root": root or PROJECT_ROOT})
    except ValidationError as e:
        raise SpecError(source, problems_from(e)) from None
