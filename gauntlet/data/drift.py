"""Data drift before training: the new training data against the data the current champion was trained on.

The champion's lineage names its data version (``data.md5``); the run that registered it logged the
``DatasetRef`` it pulled (``dataset_ref.json`` of its ``pull_data`` stage), which names the training file's
own md5, and DVC keeps that version's content by md5: in this host's cache, else in the DVC remote (a team's
shared store, so any host finds it). A champion whose data cannot be had is a warning in the run's summary, not a
silent pass. Compared:

- row counts (relative change);
- prompt (instruction + input) and response (output, or the last assistant turn) lengths in characters, by the
  population stability index over the reference's deciles (PSI; 0.1 is a small shift, 0.25 a large one) and
  the two-sample Kolmogorov-Smirnov statistic;
- overlap: the share of new rows whose prompt the old set already had.

A threshold in ``data.checks`` that a measure passes fails the run before training, naming the field that
moved and by how much. No Prefect here.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel

from gauntlet.config.data import DataChecksSpec
from gauntlet.data import preference

FIELDS = ("prompt_chars", "response_chars")


class DriftReport(BaseModel):
    reference: str                               # what the new data was compared with (version, md5)
    rows: dict[str, int]                         # {"reference": n, "new": n}
    row_change: float                            # relative change of the row count
    psi: dict[str, float]                        # field -> PSI
    noise_floor: dict[str, float] = {}           # field -> PSI a sample of the new size from the reference reaches
    ks: dict[str, float]                         # field -> KS statistic
    median: dict[str, dict[str, float]]          # field -> {"reference": m, "new": m}
    overlap: float                               # share of new prompts already in the reference
    problems: list[str] = []

    @property
    def passed(self) -> bool:
        return not self.problems


def _text(row: dict) -> tuple[str, str]:
    """(prompt, response) of an alpaca, chat or preference row (a pair's response: its chosen completion)."""
    if "chosen" in row or ("completion" in row and "label" in row):
        prompt, responses = preference.prompt_and_responses(row)
        return prompt, responses[0]
    turns = row.get("messages") or row.get("conversations")
    if isinstance(turns, list) and turns:
        said = [(t.get("role") or t.get("from"), t.get("content") or t.get("value") or "") for t in turns
                if isinstance(t, dict)]
        answers = [text for who, text in said if who in ("assistant", "gpt")]
        prompts = [text for who, text in said if who not in ("assistant", "gpt")]
        return "\n".join(prompts), answers[-1] if answers else ""
    return f"{row.get('instruction', '')}\n{row.get('input', '')}".strip(), str(row.get("output", ""))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def lengths(rows: Iterable[dict]) -> dict[str, list[int]]:
    pairs = [_text(r) for r in rows]
    return {"prompt_chars": [len(p) for p, _ in pairs], "response_chars": [len(a) for _, a in pairs]}


def quantile_edges(reference: Sequence[float], bins: int = 10) -> list[float]:
    """Bin edges at the reference's quantiles (fewer when values repeat)."""
    ref = sorted(reference)
    return sorted({ref[min(len(ref) - 1, int(len(ref) * q / bins))] for q in range(1, bins)})


def bin_counts(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    counts = [0] * (len(edges) + 1)
    for v in values:
        counts[bisect.bisect_right(edges, v)] += 1
    return counts


def psi_counts(reference: Sequence[float], new: Sequence[float]) -> float:
    """Population stability index of two histograms over the same bins (empty bins smoothed by half a count).
    The one PSI of the project: data drift before training and served-prompt drift in a canary use it."""
    def shares(counts: Sequence[float]) -> list[float]:
        return [(c + 0.5) / (sum(counts) + 0.5 * len(counts)) for c in counts]

    a, b = shares(reference), shares(new)
    return math.fsum((q - p) * math.log(q / p) for p, q in zip(a, b, strict=True))


def psi(reference: Sequence[float], new: Sequence[float], bins: int = 10) -> float:
    """PSI of ``new`` against ``reference``, over the reference's quantile bins."""
    edges = quantile_edges(reference, bins)
    return psi_counts(bin_counts(reference, edges), bin_counts(new, edges))


def sampled_floor(reference: Sequence, n: int, measure, draws: int = 200, quantile: float = 0.99,
                  seed: int = 0) -> float:
    """The ``quantile`` of ``measure(sample)`` over ``draws`` samples of ``n`` items drawn from ``reference``
    itself: how far a measure like PSI, biased upward on small samples, goes by chance alone. Data drift
    and served-prompt drift both ask a shift to clear it."""
    import random

    rng = random.Random(seed)
    values = sorted(measure([rng.choice(reference) for _ in range(n)]) for _ in range(draws))
    return values[min(draws - 1, int(quantile * draws))]


def psi_floor(reference: Sequence[float], n: int) -> float:
    """The PSI ``n`` values drawn from ``reference`` reach by chance (99th percentile), over its quantile bins."""
    edges = quantile_edges(reference)
    ref_counts = bin_counts(reference, edges)
    return sampled_floor(list(reference), n, lambda sample: psi_counts(ref_counts, bin_counts(sample, edges)))


def ks(reference: Sequence[float], new: Sequence[float]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    a, b = sorted(reference), sorted(new)
    return max(abs(bisect.bisect_right(a, x) / len(a) - bisect.bisect_right(b, x) / len(b)) for x in a + b)


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return float(s[len(s) // 2]) if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def compare(reference_rows: list[dict], new_rows: list[dict], checks: DataChecksSpec, reference: str) -> DriftReport:
    """The new training rows against the reference's, each measure checked against its ``data.checks`` limit."""
    old, new = lengths(reference_rows), lengths(new_rows)
    old_prompts = {_text(r)[0].strip().lower() for r in reference_rows}
    report = DriftReport(
        reference=reference, rows={"reference": len(reference_rows), "new": len(new_rows)},
        row_change=(len(new_rows) - len(reference_rows)) / max(1, len(reference_rows)),
        psi={f: psi(old[f], new[f]) for f in FIELDS}, ks={f: ks(old[f], new[f]) for f in FIELDS},
        noise_floor={f: psi_floor(old[f], len(new[f])) for f in FIELDS if old[f] and new[f]},
        median={f: {"reference": _median(old[f]), "new": _median(new[f])} for f in FIELDS},
        overlap=sum(_text(r)[0].strip().lower() in old_prompts for r in new_rows) / max(1, len(new_rows)))
    problems = []
    if checks.max_length_psi is not None:
        for f in FIELDS:
            floor = report.noise_floor.get(f, 0.0)
            # a shift must clear the limit and what this many rows reach by chance (small sets inflate PSI)
            if report.psi[f] > max(checks.max_length_psi, floor):
                m = report.median[f]
                problems.append(f"{f} shifted against {reference}: PSI {report.psi[f]:.3f} > data.checks."
                                f"max_length_psi {checks.max_length_psi} (median {m['reference']:g} → {m['new']:g} "
                                f"chars, KS {report.ks[f]:.3f}; {len(new[f])} rows reach PSI {floor:.3f} by chance)")
    if checks.max_row_change is not None and abs(report.row_change) > checks.max_row_change:
        problems.append(f"row count changed {report.row_change:+.1%} against {reference} ({len(reference_rows)} → "
                        f"{len(new_rows)}) > data.checks.max_row_change {checks.max_row_change:.0%}")
    return report.model_copy(update={"problems": problems})


def dvc_cached_file(repo: Path, md5: str) -> Path | None:
    """The file DVC stored under ``md5`` in the repository's cache; None if it is not there (DVC 3 layout
    ``files/md5/ab/cdef…``, and DVC 2's ``ab/cdef…``)."""
    root = Path(repo) / ".dvc" / "cache"
    for path in (root / "files" / "md5" / md5[:2] / md5[2:], root / md5[:2] / md5[2:]):
        if path.is_file():
            return path
    return None


def dvc_remote_file(repo: Path, md5: str, into: Path) -> Path | None:
    """The file stored under ``md5`` in the repository's default DVC remote (any kind DVC reaches: a team's S3, a
    folder), downloaded to ``into``; None when the remote does not have it or there is no remote."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        try:
            odb = r.cloud.get_remote_odb(None, hash_name="md5")
        except Exception:   # no default remote configured
            return None
        path = odb.oid_to_path(md5)
        if not odb.fs.exists(path):
            return None
        into.parent.mkdir(parents=True, exist_ok=True)
        partial = into.with_name(f"{into.name}.partial-{os.getpid()}")
        odb.fs.get_file(path, str(partial))
        os.replace(partial, into)   # runs side by side each write their own, then one name
    return into


class NotMeasured(BaseModel):
    """Why drift was not measured; ``warning``: the reference exists but could not be read (a run's summary says so),
    rather than there being nothing to compare with."""
    reason: str
    warning: bool = False


def champion_training_file(c, registry, data, into: Path) -> tuple[Path, str] | NotMeasured:
    """(the champion's training file, as DVC stored it; a label naming it) or why it cannot be had.

    ``c``: an MlflowClient; ``registry``: the RegistrySpec; ``data``: this run's DatasetRef; ``into``: where a copy
    from the DVC remote goes (this host's cache does not have every version: the team's remote does)."""
    from mlflow.exceptions import MlflowException

    from gauntlet.refs import DatasetRef

    try:
        mv = c.get_model_version_by_alias(registry.model_name, registry.champion_alias)
    except MlflowException:
        return NotMeasured(reason=f"no {registry.model_name}@{registry.champion_alias} to compare with")
    old_md5 = mv.tags.get("data.md5")
    label = f"champion v{mv.version}'s data {str(old_md5)[:12]}"
    if not old_md5:
        return NotMeasured(reason=f"champion v{mv.version} records no data.md5", warning=True)
    if old_md5 == data.md5:
        return NotMeasured(reason=f"the data is the champion's own version ({old_md5[:12]})")
    experiments = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(experiments, f"tags.`data.md5` = '{old_md5}'", max_results=20)
    for run in runs:
        try:
            ref = DatasetRef.model_validate_json(Path(c.download_artifacts(run.info.run_id,
                                                                           "dataset_ref.json")).read_text())
        except (MlflowException, OSError, ValueError):
            continue
        train_md5 = next((m for rel, m in ref.file_md5.items() if ref.train_path and ref.train_path.endswith(rel)),
                         None)
        if train_md5 is None:
            continue
        path = (dvc_cached_file(Path(data.repo), train_md5)
                or dvc_remote_file(Path(data.repo), train_md5, into / train_md5))
        if path is not None:
            return path, label
        return NotMeasured(reason=f"{label}: its training file (md5 {train_md5}) is in neither this host's DVC "
                                  "cache nor the DVC remote", warning=True)
    return NotMeasured(reason=f"{label}: no run that pulled it logged its dataset_ref.json", warning=True)
