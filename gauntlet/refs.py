"""What stages hand to each other: small typed references that carry content hashes.

A downstream cache key is built from these hashes, so a change anywhere upstream re-runs
exactly what depends on it (docs/architecture.md, "Refs carry content hashes").
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, computed_field


class Ref(BaseModel):
    model_config = ConfigDict(frozen=True)


class DatasetRef(Ref):
    """A pulled, schema-checked dataset version."""

    repo: str                      # DVC repo root
    train_path: str | None = None  # absolute paths of the pulled files (None: evaluation items only)
    validation_path: str | None = None
    eval_path: str | None = None
    md5: str                       # combined DVC md5 of the files (the data version)
    file_md5: dict[str, str]       # per file (path as in dvc.lock), as DVC records it
    eval_md5: str | None = None    # md5 of the eval file alone: evaluation results depend on it only
    validation_md5: str | None = None  # md5 of the validation file alone (held-out perplexity reads it)
    rows: dict[str, int]
    duplicate_rate: float = 0.0


class ModelRef(Ref):
    """A model (or adapter-merged model) on local disk."""

    name: str
    path: str
    source: str
    revision: str | None = None
    sha: str                       # content hash of the files
    mlflow_run_id: str | None = None
    # a registry version's own lineage (what it was trained from: its base, data md5, objective), so a model
    # trained from it records both generations; empty for any other source
    lineage: dict[str, str] = {}


class QuantizedModel(ModelRef):
    """A quantized variant: a ModelRef (so it evaluates like any model) plus how it was made."""

    variant: str                   # e.g. gptq-w4g128: the name in reports, summaries and the registry
    method: str                    # gptq | awq | bnb-nf4 | bnb-int8
    bits: int
    group_size: int | None = None
    base_sha: str                  # the unquantized model it came from
    size_bytes: int                # the variant's folder on disk
    base_size_bytes: int
    calibration_md5: str | None = None   # md5 of the calibration texts (None: calibration-free)
    duration_s: float
    output_dir: str

    @property
    def size_ratio(self) -> float:
        return self.size_bytes / self.base_size_bytes if self.base_size_bytes else float("nan")


class TrainedModel(Ref):
    base: ModelRef
    merged: ModelRef               # the merged full model; evaluation and registry use it
    adapter_path: str | None = None
    output_dir: str
    metrics: dict[str, float]
    steps: int
    mlflow_run_id: str | None = None
    objective: str | None = None   # train.objective (sft, dpo, ...); None: trained before it was recorded
    # the held-out preference accuracy per validation pair, of the starting model ("base") and the trained one
    # ("trained"); None for SFT or without validation pairs
    preference_accuracy: dict[str, list[float]] | None = None


class TaskScore(Ref):
    task: str
    metric: str
    value: float
    stderr: float | None = None
    ci_low: float | None = None            # 95% interval (gauntlet.eval.stats.interval), from the items
    ci_high: float | None = None
    n: int | None = None                   # items scored


class PerfProbe(Ref):
    backend: str
    device: str
    tokens_per_s: float                    # output tokens/s at batch 1
    first_token_latency_ms: float          # mean time to first token
    peak_memory_gb: float | None           # None: an endpoint (its server's memory is not seen from here)
    size_on_disk_gb: float | None          # None: an endpoint
    tokens_per_s_large_batch: float | None = None   # output tokens/s at batch ``large_batch``
    large_batch: int | None = None
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    prompts: int | None = None             # prompts timed at batch 1 (and for TTFT)
    max_new_tokens: int | None = None
    device_name: str | None = None         # e.g. "NVIDIA H100 80GB HBM3", or the CPU
    note: str | None = None                # how it was measured where that differs (an endpoint: streamed)


class TokenUsage(Ref):
    """Tokens an endpoint's evaluation sent and received: counted from what the endpoint reported (``usage`` in each
    response), or estimated with a tokenizer where it reported none (``how`` says which)."""

    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    how: str = "reported by the endpoint"

    def __add__(self, other: TokenUsage) -> TokenUsage:
        how = self.how if self.how == other.how or not other.requests else \
            other.how if not self.requests else f"{self.how}; {other.how}"
        return TokenUsage(input_tokens=self.input_tokens + other.input_tokens, requests=self.requests + other.requests,
                          output_tokens=self.output_tokens + other.output_tokens, how=how)


class TaskResult(Ref):
    """One task of an evaluation: lm-eval's scores for it (and its subtasks) and its reported score."""

    task: str                              # the name in the report (suites.yaml or the task YAML)
    engine_task: str                       # the lm-eval task or group that ran
    source: str                            # fixture | engine | local
    metric: str                            # the reported metric
    value: float | None                    # its value, 0..1
    stderr: float | None = None
    random_baseline: float = 0.0
    random_baseline_source: str = "declared"   # or how it was measured ("mean of 1/choices over 48 items")
    normalized: float | None = None        # 0 at the random baseline, 100 at a perfect score
    scores: list[TaskScore]                # every metric of the task and its subtasks
    versions: dict[str, str]               # lm-eval task versions (the task and its subtasks)
    num_fewshot: int
    limit: int | None = None
    n_samples: dict[str, int] = {}         # items evaluated per leaf task
    seconds: float = 0.0
    item_scores: dict[str, dict[str, float]] = {}  # metric -> {"task/doc_id": score}: what paired tests compare
    effective: dict[str, dict] = {}        # per leaf task: the settings lm-eval applied (shots, generation, filters)
    repeat_values: list[float] = []        # eval.repeats > 1: the reported metric of each repeat
    repeat_seeds: list[int] = []
    changed_items: list[str] = []          # greedy repeats: items whose answer changed between repeats
    results_path: str                      # lm-eval's results (JSON) and per-item samples (JSONL)
    samples_path: str
    mlflow_run_id: str | None = None
    usage: TokenUsage | None = None        # an endpoint's tokens for this task (None: local weights, or not known)


class PerplexityResult(Ref):
    """Byte perplexity of a model on the run's held-out rows (``eval.perplexity``), with its 95% interval."""

    split: str                             # validation | eval: which of the run's files
    text: str = "response"                 # response (given its prompt) | full (prompt and response)
    data_md5: str | None                   # its DVC md5: two results compare only on the same data
    n: int                                 # rows scored
    byte_perplexity: float                 # exp(-sum loglik / sum bytes): lower is better
    ci_low: float                          # bootstrap over rows
    ci_high: float
    bits_per_byte: float
    word_perplexity: float | None = None
    seconds: float = 0.0
    items: dict[str, list[float]] = {}     # row id -> [loglik, bytes, words]: what the paired comparison resamples


class EvalReport(Ref):
    model: str
    model_sha: str
    variant: str = "base"
    scores: list[TaskScore]
    perf: PerfProbe | None = None
    perplexity: PerplexityResult | None = None
    protocol: dict
    versions: dict
    timestamp: str
    report_path: str
    mlflow_run_id: str | None = None
    suite: str | None = None
    task_results: list[TaskResult] = []
    normalized: dict[str, float] = {}      # task -> normalized score (0-100), for tasks with a score
    average_normalized: float | None = None
    usage: TokenUsage | None = None        # an endpoint's tokens over its tasks (None: local weights, or not known)

    def result(self, task: str) -> TaskResult | None:
        """The task's result (its reported metric, baseline and per-item records); None for a subtask."""
        return next((r for r in self.task_results if r.task == task), None)

    def resolve(self, task: str, metric: str) -> TaskScore:
        """The task's one score under ``metric``: that exact name, else, for a name without a filter
        (``exact_match``), the task's only filtered score of that metric (``exact_match,last-number``).
        Raises :class:`MetricLookupError` when the task or the metric is not in the report, or when the
        name fits several filters. Every reader resolves names here (:mod:`gauntlet.eval.scores`)."""
        rows = [s for s in self.scores if s.task == task]
        if not rows:
            raise MetricLookupError(task, metric, "task", sorted({s.task for s in self.scores}))
        exact = next((s for s in rows if s.metric == metric), None)
        if exact is not None:
            return exact
        filtered = [] if "," in metric else [s for s in rows if s.metric.partition(",")[0] == metric]
        if len(filtered) == 1:
            return filtered[0]
        if filtered:
            raise MetricLookupError(task, metric, "ambiguous", sorted(s.metric for s in filtered))
        raise MetricLookupError(task, metric, "metric", sorted({s.metric for s in rows}))

    def score(self, task: str, metric: str) -> float | None:
        """The value :meth:`resolve` finds; None when it finds none."""
        try:
            return self.resolve(task, metric).value
        except MetricLookupError:
            return None


class MetricLookupError(LookupError):
    """A metric name that resolves to no single score of a task: the task is not in the report
    (``kind="task"``), the task has no such metric (``"metric"``), or a name without a filter fits several
    filtered scores (``"ambiguous"``). ``known`` lists what there is: tasks, metrics, or the fitting names."""

    def __init__(self, task: str, metric: str, kind: Literal["task", "metric", "ambiguous"], known: list[str]):
        self.task, self.metric, self.kind, self.known = task, metric, kind, known
        super().__init__(self.explain("the metric"))

    @property
    def ambiguous(self) -> bool:
        return self.kind == "ambiguous"

    def explain(self, setting: str) -> str:
        """The message, naming ``setting`` (``gate.metric``, ``ranking.task_metrics.gsm8k``) as the fix."""
        if self.kind == "task":
            return (f"task {self.task!r} is not in the report (its tasks: {self.known}); add it to eval.tasks or "
                    "fix the task name")
        if self.kind == "ambiguous":
            return (f"{self.metric!r} fits {len(self.known)} filtered scores of task {self.task!r}: {self.known}; "
                    f"set {setting} to one of them")
        return (f"task {self.task!r} has no {self.metric!r} score in the report; its metrics: {self.known}. Set "
                f"{setting} to one of them (a filtered metric is named 'metric,filter')")


Verdict = Literal["passed", "failed", "refused"]
VERDICT_LABELS: dict[str, str] = {"passed": "pass", "failed": "FAIL", "refused": "REFUSED"}


class GateRule(Ref):
    """One rule's verdict with the numbers it judged. ``refused``: the rule could not judge (the two models
    were measured differently, the metric name fits several scores); a refused rule fails the gate."""

    rule: str                          # min_score[facts], no_regression[facts], min_average, …
    verdict: Verdict
    measured: float | None             # what was judged: a score, a mean, a difference
    limit: float | None
    reference: float | None = None     # what it was compared with: the base model's or the champion's score
    against: str | None = None         # whom: "base model", "champion v3" (comparison rules only)
    lo: float | None = None            # the interval of ``measured`` the rule read, when it read one
    hi: float | None = None
    detail: str = ""

    @computed_field  # type: ignore[prop-decorator]  # pydantic's documented pattern; mypy does not model it
    @property
    def passed(self) -> bool:
        return self.verdict == "passed"

    @property
    def label(self) -> str:
        """``pass``, ``FAIL`` or ``REFUSED``, as tables show it."""
        return VERDICT_LABELS[self.verdict]


class GateDecision(Ref):
    passed: bool
    rules: list[GateRule]
    compared_to: str | None = None          # champion version compared against
    champion_scores: dict[str, float] = {}

    @property
    def reasons(self) -> list[str]:
        return [f"{r.rule}: {r.detail}" for r in self.rules if not r.passed]

    def markdown(self, model_name: str) -> str:
        """The decision as the gate stage's artifact shows it: one table row per rule."""
        def number(x: float | None) -> str:
            return "—" if x is None else f"{x:.4f}"

        against = f"champion v{self.compared_to}" if self.compared_to else "no champion yet"
        lines = [f"# Gate {'PASSED' if self.passed else 'FAILED'}: {model_name}", "", f"Compared against: {against}",
                 "", "| rule | measured | limit | verdict | detail |", "|---|---|---|---|---|"]
        lines += [f"| {r.rule} | {number(r.measured)} | {number(r.limit)} | "
                  f"{r.label if r.passed else f'**{r.label}**'} | {r.detail} |" for r in self.rules]
        return "\n".join(lines)

    def as_json(self, model_name: str, version: str | None = None) -> dict:
        return {"model_name": model_name, "version": version, "verdict": "passed" if self.passed else "failed",
                **self.model_dump(mode="json"), "reasons": self.reasons}

    def metrics(self) -> dict[str, float]:
        """The decision as MLflow metrics: ``gate_passed`` and each rule's measured value."""
        from gauntlet.names import mlflow_name

        out = {"gate_passed": float(self.passed)}
        out.update({mlflow_name("gate", r.rule): float(r.measured) for r in self.rules if r.measured is not None})
        return out


class RegisteredVersion(Ref):
    """A model version in the registry (the candidate a run registered, or found already registered)."""

    model_name: str
    version: str
    source: str                    # where its files are: the durable artifact it was registered from
    model_sha: str
    created: bool                  # False: an earlier run registered these exact files
    mlflow_run_id: str | None = None


class PromotionResult(Ref):
    registered: bool               # True: the champion alias moved to this run's version
    model_name: str
    version: str | None = None
    alias: str | None = None
    message: str
    previous_champion: str | None = None
    decision: GateDecision | None = None   # the decision promotion acted on (re-gated if the champion changed)
