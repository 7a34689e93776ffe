"""Leaderboard candidates: model sources like any flow's, one row per candidate × variant, whatever happens.

A candidate is resolved like every model source (registry aliases each night, unpinned sources
re-hashed); one that cannot be resolved fails its own row only. A variant the night cannot produce (a
calibrated one without calibration data) is a skipped row with its reason, never a made-up score. Each row
names the candidate's training objective where it is known (:func:`objective_of`), never guessed. An endpoint
candidate is prepared by asking it (:func:`endpoint_prepared`), its one row (variant ``served``) priced from the
tokens its evaluation sent and received.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from gauntlet.config.endpoint import EndpointSpec
from gauntlet.config.leaderboard import LEADERBOARD_VARIANTS, LeaderboardCandidate, LeaderboardSpec
from gauntlet.config.model import ModelSpec
from gauntlet.config.problems import problems_from
from gauntlet.config.quantize import QuantizeVariant
from gauntlet.hashing import sha256_json
from gauntlet.models import ResolvedModel
from gauntlet.names import OBJECTIVE_TAG  # lineage_of writes it; versions registered before it lack it
from gauntlet.project import project_root
from gauntlet.refs import DatasetRef, EvalReport, ModelRef, Ref
from gauntlet.secrets import api_key


class CandidateError(RuntimeError):
    """A candidate that cannot be resolved (missing folder, unknown registry alias, …): fails its row only."""


# ---------------------------------------------------------------------------------------------
# what the flow hands around
# ---------------------------------------------------------------------------------------------


class PreparedCandidate(Ref):
    resolved: ResolvedModel
    model: ModelRef


class JobRecord(Ref):
    """Where one candidate x variant ran and how long: its board row's host, GPU and times."""

    host: str
    worker: str                           # the pool worker (gauntlet worker's name), or "local"
    gpu: str                              # the device's name and index on its host (or the CPU cores)
    wall_s: float = 0.0                   # the job from its start to its end, on its worker
    gpu_s: float = 0.0                    # of which on the device: quantize, evaluate, safety


class CandidateOutcome(Ref):
    candidate: str
    variant: str
    source: str
    status: Literal["ok", "failed", "skipped"]
    reason: str | None = None
    note: str | None = None
    objective: str | None = None          # how the model was trained (sft, dpo, ...); None: unknown
    model_sha: str | None = None
    report: EvalReport | None = None
    job: JobRecord | None = None
    cost_usd: float | None = None         # an endpoint's evaluation at its configured price (None: no price or usage)


def objective_of(candidate: LeaderboardCandidate, resolved: ResolvedModel) -> tuple[str | None, str | None]:
    """The row's training objective and its note: a registry version's train.objective tag, else the config's
    ``objective:``, else None (unknown: never guessed). A declared objective the tag contradicts loses, and the
    note says so."""
    tagged, declared = resolved.lineage.get(OBJECTIVE_TAG) or None, candidate.objective
    if tagged is None or declared is None or tagged == declared:
        return tagged or declared, resolved.note
    clash = f"the config declares objective {declared}, the version's {OBJECTIVE_TAG} tag says {tagged}: {tagged} shown"
    return tagged, f"{resolved.note}; {clash}" if resolved.note else clash


SERVED = "served"   # an endpoint's one variant: as it serves


def variants_of(candidate: LeaderboardCandidate, spec: LeaderboardSpec) -> list[str]:
    if candidate.endpoint is not None:
        return [SERVED]
    return list(candidate.variants if candidate.variants is not None else spec.variants)


def ok_outcome(candidate: LeaderboardCandidate, variant: str, prepared: PreparedCandidate,
               report: EvalReport, job: JobRecord | None = None) -> CandidateOutcome:
    objective, note = objective_of(candidate, prepared.resolved)
    cost, ep = None, candidate.endpoint
    if ep is not None and ep.price_per_million is not None and report.usage is not None:
        u, price = report.usage, ep.price_per_million
        cost = (u.input_tokens * price.input + u.output_tokens * price.output) / 1e6
        note = f"{note}; cost from {u.input_tokens} input + {u.output_tokens} output tokens, {u.how}"
    # an endpoint evaluated again each night has no content hash: its rows never say "new weights"
    sha = None if ep is not None and not ep.pinned else report.model_sha
    return CandidateOutcome(candidate=candidate.display_name, variant=variant, source=candidate.origin, status="ok",
                            note=note, objective=objective, model_sha=sha, report=report, job=job, cost_usd=cost)


# A failed or skipped row shows the objective its config declares: its version's tag is read when it is scored.
def failed_outcome(candidate: LeaderboardCandidate, variant: str, reason: str,
                   job: JobRecord | None = None) -> CandidateOutcome:
    return CandidateOutcome(candidate=candidate.display_name, variant=variant, source=candidate.origin,
                            status="failed", reason=reason, objective=candidate.objective, job=job)


def skipped_outcome(candidate: LeaderboardCandidate, variant: str, reason: str) -> CandidateOutcome:
    return CandidateOutcome(candidate=candidate.display_name, variant=variant, source=candidate.origin,
                            status="skipped", reason=reason, objective=candidate.objective)


def candidate_model(candidate: LeaderboardCandidate) -> ModelSpec:
    """The candidate as a model source; CandidateError (its row fails, not the night) when it cannot exist."""
    raw = {"source": candidate.source, "revision": candidate.revision, "trust_remote_code": candidate.trust_remote_code}
    try:
        return ModelSpec.model_validate(raw, context={"root": project_root()})
    except ValidationError as e:
        raise CandidateError(f"candidate {candidate.display_name}: "
                             + "; ".join(f"{p.path}: {p.message}" for p in problems_from(e, ModelSpec))) from None


def endpoint_key(candidate: LeaderboardCandidate, read_secret: Callable[[str], str] | None) -> str | None:
    """The endpoint's API key from its variable or Secret block (``read_secret``: the stage's reader);
    CandidateError (its row fails) when it is not there."""
    ep = candidate.endpoint
    assert ep is not None
    try:
        return api_key(ep.api_key_env, ep.api_key_secret, f"candidate {candidate.display_name}: endpoint", read_secret)
    except LookupError as e:
        raise CandidateError(str(e)) from None


def endpoint_prepared(candidate: LeaderboardCandidate, key: str | None, night: str) -> PreparedCandidate:
    """An endpoint candidate, once it answers (EndpointError naming its status or error otherwise): a ModelRef whose
    path is its base URL and whose sha names the endpoint, and tonight too unless it is ``pinned`` (what serves
    behind a URL can change without its name changing: evaluated again each night)."""
    from gauntlet.eval.endpoint import check_endpoint

    ep: EndpointSpec | None = candidate.endpoint
    assert ep is not None
    found = check_endpoint(ep, key)
    sha = sha256_json({"endpoint": ep.base_url, "model": ep.model, **({} if ep.pinned else {"night": night})})
    model = ModelRef(name=candidate.display_name, path=ep.base_url, source=candidate.origin, sha=sha)
    resolved = ResolvedModel(source=candidate.origin, model=ModelSpec.model_construct(source=candidate.origin),
                             note=f"{found}; measured through its API (device and dtype are the server's)",
                             stable=ep.pinned)
    return PreparedCandidate(resolved=resolved, model=model)


def preload_model_libraries() -> None:
    """Import transformers' auto classes and lm-eval's hf model once, before candidates run in threads.

    transformers resolves its attributes lazily, and two threads doing that for the first time at once
    can leave ``transformers.AutoConfig`` missing in one of them (seen as
    ``AttributeError: module 'transformers' has no attribute 'AutoConfig'`` when a demo model is being
    built while another candidate starts its evaluation).
    """
    import transformers
    from lm_eval.models import huggingface  # noqa: F401  (registers and imports the hf backend)

    for name in ("AutoConfig", "AutoModelForCausalLM", "AutoTokenizer", "LlamaConfig", "LlamaForCausalLM",
                 "PreTrainedTokenizerFast"):
        getattr(transformers, name)


# ---------------------------------------------------------------------------------------------
# evaluation data given as a plain file
# ---------------------------------------------------------------------------------------------


def eval_file_dataset(path: Path) -> DatasetRef:
    """A DatasetRef carrying only evaluation items from a plain JSONL file (md5 of its bytes as version)."""
    data = path.read_bytes()
    md5 = hashlib.md5(data).hexdigest()
    rows = sum(1 for line in data.splitlines() if line.strip())
    return DatasetRef(repo=str(path.parent), eval_path=str(path), md5=md5, file_md5={path.name: md5}, eval_md5=md5,
                      rows={"eval": rows})


def quantization_of(variant: str) -> QuantizeVariant | None:
    return None if variant == SERVED else LEADERBOARD_VARIANTS[variant]


def variant_skip_reason(variant: str, data: DatasetRef | None) -> str | None:
    """Why this variant cannot be produced tonight (None: it can). Never replaced by a made-up score."""
    quant = quantization_of(variant)
    if quant is not None and quant.calibrated and (data is None or data.train_path is None):
        return (f"{variant} calibrates on the run's data: give the leaderboard config a data: section whose "
                "train file holds calibration rows; not evaluated")
    return None
