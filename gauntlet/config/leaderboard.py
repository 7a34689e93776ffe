"""A leaderboard config (configs/leaderboard.yaml): candidates, variants, the suite, ranking, publication."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from gauntlet.config.base import Strict, require_unique, resolve
from gauntlet.config.data import DataSpec
from gauntlet.config.endpoint import EndpointSpec, endpoint_task_problems
from gauntlet.config.eval import EvalSpec, task_names
from gauntlet.config.model import REGISTRY_SCHEME, SourcesSpec, check_source_scheme, refuse_remote_code
from gauntlet.config.notify import NotifySpec, TrackingSpec
from gauntlet.config.problems import did_you_mean
from gauntlet.config.quantize import CalibrationSpec, QuantizeVariant
from gauntlet.config.train import Objective
from gauntlet.eval.suites import filters_a_name_fits

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
    ``s3://…`` or ``models:/NAME@alias`` / ``models:/NAME/VERSION`` (the MLflow Model Registry); or, instead of a
    source, an OpenAI-compatible ``endpoint`` (gauntlet/config/endpoint.py), evaluated as served (variant ``served``).

    Availability (a local folder that exists, a registry alias that is set) is checked when the
    leaderboard runs: a missing candidate fails on its own row and does not stop the others."""

    source: str | None = None
    endpoint: EndpointSpec | None = Field(None, description="an OpenAI-compatible endpoint instead of a source")
    name: str | None = Field(None, description="display name (default: derived from the source)")
    revision: str | None = Field(None, description="hub revision; '@rev' in source also works")
    trust_remote_code: bool = False
    variants: list[str] | None = Field(None, description="variants of this candidate (default: the top-level list)")
    objective: Objective | None = Field(None, description="how it was trained, for the board's objective column "
                                                          "(a registry version's train.objective tag wins)")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str | None) -> str | None:
        if v is not None:
            check_source_scheme(v)
        return v

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, v: bool) -> bool:
        return refuse_remote_code(v)

    @field_validator("variants")
    @classmethod
    def _variants_known(cls, v: list[str] | None) -> list[str] | None:
        return _known_variants(v)

    @field_validator("objective", mode="before")
    @classmethod
    def _objective_known(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in get_args(Objective):
            raise ValueError(f"unknown training objective {v!r}. Fix: "
                             + did_you_mean(v, get_args(Objective), "objectives") + " (or leave it out: unknown)")
        return v

    @model_validator(mode="after")
    def _source_or_endpoint(self) -> LeaderboardCandidate:
        if (self.source is None) == (self.endpoint is None):
            raise ValueError("give a candidate exactly one of source (weights) or endpoint (an OpenAI-compatible API)")
        if self.endpoint is not None and (self.revision or self.variants):
            raise ValueError("revision and variants belong to weights: an endpoint is evaluated as it serves "
                             "(variant served). Fix: remove them from this candidate")
        return self

    @property
    def origin(self) -> str:
        """Where the candidate comes from, as its row shows it: the source, or the endpoint's URL and model."""
        return f"{self.endpoint.base_url} ({self.endpoint.model})" if self.endpoint else self.source or ""

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        if self.endpoint is not None:
            return self.endpoint.model
        source = self.source or ""
        if source.startswith(REGISTRY_SCHEME):
            return source.removeprefix(REGISTRY_SCHEME)
        if "://" in source:
            rest = source.split("://", 1)[1]
            return rest + (f"@{self.revision[:12]}" if self.revision else "")
        return Path(source).name or source


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

    @field_validator("dir")
    @classmethod
    def _dir_inside(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None:
            resolve(v, info)   # inside the project, or refused with the fix
        return v


class ConcurrencySpec(Strict):
    gpu_tag: str = Field("gpu", min_length=1, description="Prefect tag on GPU tasks (evaluate, quantize)")
    gpu_slots: int = Field(1, gt=0, description="tag concurrency limit created when none exists")
    pool: str | None = Field(None, min_length=1, description="a team's GPU work pool: each candidate x variant runs "
                             "as its own flow run there (deployment `job_deployment`), on the queue of the GPU class "
                             "it needs; None: in this process, tagged for the gpu concurrency limit")
    job_deployment: str = Field("leaderboard-job/pool", pattern=r"^[^/]+/[^/]+$",
                                description="the deployment (FLOW/NAME) that runs one job on the pool")
    job_timeout_minutes: float = Field(24 * 60, gt=0, description="longest a job may take from submission to its "
                                       "end, waiting in the queue included; past it, its row fails")


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
    sources: SourcesSpec = Field(SourcesSpec(), description="the model sources `gauntlet submit` may queue (and "
                                                           "the candidates may name); empty: every source")
    notify: NotifySpec = Field(NotifySpec(), description="webhooks told when a submission fails or misses its "
                                                         "24 h promise (the run_failed event)")

    @field_validator("variants")
    @classmethod
    def _variants_known(cls, v: list[str] | None) -> list[str] | None:
        return _known_variants(v)

    @field_validator("candidates")
    @classmethod
    def _unique_names(cls, v: list[LeaderboardCandidate]) -> list[LeaderboardCandidate]:
        require_unique([c.display_name for c in v], "candidate", "give each a distinct `name:`")
        return v

    @field_validator("sources")
    @classmethod
    def _candidates_allowed(cls, v: SourcesSpec, info: ValidationInfo) -> SourcesSpec:
        refused = [why for c in info.data.get("candidates") or [] if (why := v.refusal(c.source))]
        if refused:
            raise ValueError("; ".join(refused) + ". Fix: add a pattern to sources.allow, or drop the candidate")
        return v

    @field_validator("eval_file")
    @classmethod
    def _eval_file(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if info.data.get("data") is not None:
            raise ValueError("give either data (DVC) or eval_file, not both")
        if not resolve(v, info).is_file():
            raise ValueError(f"eval file {str(resolve(v, info))!r} does not exist")
        return v

    @field_validator("eval")
    @classmethod
    def _perplexity_has_its_file(cls, v: EvalSpec, info: ValidationInfo) -> EvalSpec:
        if v.perplexity is not None and v.perplexity.split == "validation" and info.data.get("data") is None:
            raise ValueError("eval.perplexity reads data.validation, and this leaderboard has no DVC data. Fix: set "
                             "data (with a validation file), or eval.perplexity.split: eval")
        return v

    @field_validator("eval")
    @classmethod
    def _endpoints_run_the_tasks(cls, v: EvalSpec, info: ValidationInfo) -> EvalSpec:
        problems = [p for i, c in enumerate(info.data.get("candidates") or []) if c.endpoint is not None
                    for p in endpoint_task_problems(c.endpoint, v, resolve(v.tasks_dir, info),
                                                    f"candidates[{i}].endpoint ({c.display_name})")]
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @field_validator("ranking")
    @classmethod
    def _ranking_names_tasks(cls, v: RankingSpec, info: ValidationInfo) -> RankingSpec:
        ev = info.data.get("eval")
        if ev is None:
            return v  # eval itself is invalid; that error is reported
        tasks = set(task_names(ev.tasks))
        problems = [f"suite {s!r} names task(s) {sorted(set(ts) - tasks)} not in eval.tasks"
                    for s, ts in v.suites.items() if set(ts) - tasks or not ts]
        problems += [f"task_metrics names {t!r}, not in eval.tasks" for t in v.task_metrics if t not in tasks]
        tasks_dir = resolve(ev.tasks_dir, info)
        for t in sorted(tasks):   # a name without a filter where the task has several: refused now, not unranked
            metric = v.task_metrics.get(t, v.metric)
            if len(fits := filters_a_name_fits(tasks_dir, t, metric)) > 1:
                problems.append(f"metric {metric!r} fits {len(fits)} filters of task {t}: {', '.join(fits)}; name "
                                f"one in task_metrics, e.g. {t}: '{metric},{fits[0]}'")
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
