"""The night, planned before it runs: how long each candidate × variant takes, how many GPU-hours the
night costs, and whether its window holds them with K GPU workers (``gauntlet leaderboard --plan``).

* **Jobs**: one per candidate × variant: the model's parameters (from its config.json), the tasks and their
  items (the catalogue's ``items``, capped by ``eval.limit``), and whether the variant is quantized first.
  The plan assumes nothing is cached (an upper bound: an unchanged model costs nothing on the night).
* **Costs**: a task's seconds per item come from an earlier report of the same candidate × variant on the same
  card kind when the board's history in MLflow has one ("measured"); otherwise from the stated assumptions below
  ("assumed"): prefill at :data:`MFU` of the card's bf16 rate over the tokens an item adds (vLLM's prefix
  cache, on by default, computes a context once when an item's choices share it, or items share their
  few-shot examples: :data:`TOKENS`), generation at the card's memory bandwidth shared by a batch of
  :data:`DECODE_BATCH` sequences, a model load of :data:`LOAD_S` per job, GPTQ/AWQ at
  :data:`QUANTIZE_S_PER_B` per billion parameters (llm-compressor documents about 30 minutes for an 8B on an
  A100; an H100 is taken as ~2x faster), and the speed probe at :data:`PROBE_S`. Every row says which it used.
* **Schedule**: longest job first, onto the least loaded of K workers (the ``gpu`` tag concurrency limit):
  the night's wall time is the last worker's end, and the GPUs are busy for the jobs' total over K x that.

No Prefect and no MLflow here; the CLI reads the config and the history and hands them in.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

CARDS = {  # bf16 dense TFLOP/s and memory TB/s by the vendors' datasheets (SXM parts)
    "H100": (989.0, 3.35), "H200": (989.0, 4.8), "A100": (312.0, 2.0), "L40S": (362.0, 0.86),
}
MFU = 0.40                   # share of the bf16 rate batched prefill reaches (vLLM, long prompts)
BANDWIDTH_USE = 0.70         # share of the memory bandwidth batched decode reaches
DECODE_BATCH = 64            # sequences decoded together
LOAD_S = 90.0                # per job: weights from local disk, engine start, CUDA graphs
QUANTIZE_S_PER_B = 110.0     # GPTQ/AWQ (llm-compressor) per billion parameters on an H100: 8B in ~15 min
PROBE_S = 30.0               # the speed probe per job

# Tokens one item adds to prefill, and tokens it generates, by task (lm-eval's prompts with the catalogue's
# few-shot counts). MMLU, C-Eval, CMMLU and BBH take their few-shot examples from a fixed dev set per subject,
# so the prefix cache shares them: an item adds its question and choices. ARC (25-shot), HellaSwag (10-shot)
# and GSM8K (5-shot) draw examples per item: an item adds its whole context, once for all its choices, plus
# each choice's continuation.
TOKENS: dict[str, tuple[int, int]] = {
    "mmlu": (130, 0), "ceval-valid": (150, 0), "cmmlu": (150, 0), "bbh": (200, 256),
    "arc_challenge": (1340, 0), "hellaswag": (1090, 0), "gsm8k": (850, 256),
}
DEFAULT_TOKENS = (500, 32)       # a task the table does not know: its rows say so


@dataclass(frozen=True)
class TaskLoad:
    name: str
    items: int
    seconds_per_item: float | None = None   # measured earlier on this device kind (None: assume)


@dataclass(frozen=True)
class Job:
    candidate: str
    variant: str
    params_b: float                          # billions of parameters (the unquantized model's)
    tasks: tuple[TaskLoad, ...]
    quantize: bool = False
    params_note: str = "from config.json"


@dataclass
class JobCost:
    job: Job
    seconds: float
    parts: dict[str, float]                  # load, quantize, probe, and one entry per task
    sources: dict[str, str]                  # task -> "measured" | "assumed" | "assumed (unknown task)"
    worker: int = -1
    start_s: float = 0.0


@dataclass
class NightPlan:
    card: str
    workers: int
    window_h: float
    jobs: list[JobCost] = field(default_factory=list)

    @property
    def gpu_hours(self) -> float:
        return sum(j.seconds for j in self.jobs) / 3600

    @property
    def wall_h(self) -> float:
        return max((j.start_s + j.seconds for j in self.jobs), default=0.0) / 3600

    @property
    def busy(self) -> float:
        """GPU work over the GPUs' time until the night's last job ends."""
        return self.gpu_hours / (self.workers * self.wall_h) if self.wall_h else 0.0

    @property
    def fits(self) -> bool:
        return self.wall_h <= self.window_h


def item_seconds(task: str, params_b: float, card: str) -> tuple[float, str]:
    """Assumed seconds per item of ``task`` for a model of ``params_b`` billion parameters on ``card``."""
    tflops, tbs = CARDS[card]
    prompt, generated = TOKENS.get(task, DEFAULT_TOKENS)
    prefill = 2 * params_b * 1e9 * prompt / (tflops * 1e12 * MFU)
    # decoding a batch reads the weights once per step: per sequence, 1/DECODE_BATCH of a weight read
    decode = generated * (2 * params_b * 1e9) / (tbs * 1e12 * BANDWIDTH_USE) / DECODE_BATCH
    return prefill + decode, "assumed" if task in TOKENS else "assumed (unknown task)"


def cost_of(job: Job, card: str) -> JobCost:
    parts = {"load": LOAD_S, "probe": PROBE_S}
    if job.quantize:
        parts["quantize"] = QUANTIZE_S_PER_B * job.params_b
    sources = {}
    for t in job.tasks:
        if t.seconds_per_item is not None:
            per_item, sources[t.name] = t.seconds_per_item, "measured"
        else:
            per_item, sources[t.name] = item_seconds(t.name, job.params_b, card)
        parts[t.name] = per_item * t.items
    return JobCost(job=job, seconds=sum(parts.values()), parts=parts, sources=sources)


def plan_night(jobs: list[Job], card: str = "H100", workers: int = 1, window_h: float = 8.0) -> NightPlan:
    """Cost every job, then schedule them longest first onto the least loaded of ``workers`` GPUs."""
    if card not in CARDS:
        raise ValueError(f"unknown card {card!r}; known: {', '.join(CARDS)}")
    if workers < 1:
        raise ValueError("workers must be at least 1")
    plan = NightPlan(card=card, workers=workers, window_h=window_h)
    costs = sorted((cost_of(j, card) for j in jobs), key=lambda c: -c.seconds)
    free = [(0.0, w) for w in range(workers)]
    for c in costs:
        start, worker = heapq.heappop(free)
        c.worker, c.start_s = worker, start
        heapq.heappush(free, (start + c.seconds, worker))
    plan.jobs = costs
    return plan


def render_night(plan: NightPlan) -> str:
    """The plan as markdown: one row per job, then the totals and the verdict."""
    lines = [f"# The night, planned: {len(plan.jobs)} jobs on {plan.workers} x {plan.card}", "",
             "| candidate | variant | params (B) | minutes | worker | tasks (minutes; cost source) |",
             "|---|---|---|---|---|---|"]
    for c in sorted(plan.jobs, key=lambda c: (c.worker, c.start_s)):
        tasks = ", ".join(f"{t.name} {c.parts[t.name] / 60:.1f} ({c.sources[t.name]})" for t in c.job.tasks)
        extra = f"; quantize {c.parts['quantize'] / 60:.1f}" if "quantize" in c.parts else ""
        lines.append(f"| {c.job.candidate} | {c.job.variant} | {c.job.params_b:.1f} ({c.job.params_note}) | "
                     f"{c.seconds / 60:.1f} | {c.worker + 1} | {tasks}{extra} |")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines += ["", f"- GPU-hours: {plan.gpu_hours:.2f}; wall time with {plan.workers} worker(s): {plan.wall_h:.2f} h; "
                  f"window {plan.window_h:g} h: **{verdict}**",
              f"- GPUs busy {100 * plan.busy:.0f}% of the night until the last job ends (longest job first)",
              f"- assumptions: prefill at {MFU:.0%} of {CARDS[plan.card][0]:g} TFLOP/s, decode at "
              f"{BANDWIDTH_USE:.0%} of {CARDS[plan.card][1]:g} TB/s shared by {DECODE_BATCH} sequences, "
              f"{LOAD_S:g} s to load, {PROBE_S:g} s to probe, {QUANTIZE_S_PER_B:g} s per billion parameters "
              "to quantize; the prefix cache on; nothing cached between nights (an upper bound)"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# from a leaderboard config (and its past nights) to the jobs
# ---------------------------------------------------------------------------------------------

ASSUMED_PARAMS_B = 7.0      # a candidate whose config.json cannot be read here (a registry alias not set yet, …)
ASSUMED_ITEMS = 1000        # a task whose size neither the catalogue nor its data file tells


def task_items(plan, spec) -> int:
    """Items one task evaluates: its limit, else the catalogue's ``items``, else the run's eval file's rows."""
    from gauntlet.eval.suites import load_catalog, tasks_dir_of
    from gauntlet.project import in_project

    entry = load_catalog(tasks_dir_of(spec.eval)).tasks.get(plan.name)
    items = entry.items if entry is not None and entry.items else None
    if items is None and plan.uses_run_eval_data and spec.data is not None and spec.data.eval:
        path = in_project(spec.data.repo) / spec.data.eval
        if path.is_file():
            items = sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    items = items or ASSUMED_ITEMS
    return min(items, plan.limit) if plan.limit else items


def candidate_params(candidate) -> tuple[float, str]:
    """(billions of parameters, where the number comes from) from the candidate's config.json alone."""
    from gauntlet.leaderboard.candidates import candidate_model
    from gauntlet.plan.shape import fetch_model_config, model_shape

    try:
        shape = model_shape(fetch_model_config(candidate_model(candidate)), candidate.source)
    except Exception as e:  # a source this machine cannot read: the plan says what it assumed instead
        why = " ".join(str(e).split()).replace("|", "/")
        return ASSUMED_PARAMS_B, f"assumed: {why[:90]}{'…' if len(why) > 90 else ''}"
    return shape.total_params / 1e9, "from config.json"


def measured_costs(boards: list, card: str) -> dict[tuple[str, str, str], float]:
    """Seconds per item of (candidate, variant, task) from past nights' rows that ran on a GPU of the ``card`` kind
    (its name in the row's ``gpu``), newest night winning. ``boards``: the nights as MLflow keeps them
    (``history.load_history``), so every host plans from the same costs."""
    found: dict[tuple[str, str, str], float] = {}
    for board in reversed(boards):                 # oldest first, so newer nights overwrite
        for row in board.rows:
            if row.gpu and card.lower() in row.gpu.lower():
                for task, seconds in row.task_seconds.items():
                    found[(row.candidate, row.variant, task)] = seconds
    return found


def night_jobs(spec, measured: dict[tuple[str, str, str], float] | None = None) -> list[Job]:
    """One job per candidate × variant of a leaderboard config."""
    from gauntlet.config.leaderboard import LEADERBOARD_VARIANTS
    from gauntlet.eval.suites import plan_tasks
    from gauntlet.leaderboard.candidates import variants_of

    measured = measured or {}
    plans = plan_tasks(spec.eval)
    jobs = []
    for candidate in spec.candidates:
        if candidate.endpoint is not None:   # served elsewhere: no GPU time here
            continue
        params, note = candidate_params(candidate)
        for variant in variants_of(candidate, spec):
            how = LEADERBOARD_VARIANTS[variant]
            tasks = tuple(TaskLoad(p.name, task_items(p, spec),
                                   measured.get((candidate.display_name, variant, p.name))) for p in plans)
            jobs.append(Job(candidate.display_name, variant, params, tasks, quantize=how is not None and how.calibrated,
                            params_note=note))
    return jobs
