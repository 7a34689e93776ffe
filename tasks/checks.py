"""Stage ``check_data``: duplicates, token lengths and contamination, before any training.

Key: the ``data.checks`` section, ``train.max_seq_len``, the data version and the model's content hash
(its tokenizer measures the lengths). A failed check fails the run here, naming each problem.
"""

from __future__ import annotations

from gauntlet.config.data import DataChecksSpec
from gauntlet.config.gate import RegistrySpec
from gauntlet.data.checks import DataCheckError, DataReport, check_data as run_checks
from gauntlet.data.drift import DriftReport, NotMeasured, champion_training_file, compare as compare_drift, read_rows
from gauntlet.files import write_text
from gauntlet.refs import DatasetRef, ModelRef
from gauntlet.state import gauntlet_home
from gauntlet.tasks._stage import StageRun, stage


@stage("check_data", key=lambda checks, max_seq_len, data, model: [checks, max_seq_len, data.md5, model.sha],
       outputs=lambda _, st: [st.out / "data_report.json"],
       params=lambda checks, **_: {f"checks.{k}": v for k, v in checks.model_dump().items()})
def check_data(checks: DataChecksSpec, max_seq_len: int, data: DatasetRef, model: ModelRef,
               stage: StageRun) -> DataReport:
    report = run_checks(checks, max_seq_len, data, model, stage.out)
    stage.metrics(report.prompt_tokens, prefix="prompt_tokens.")
    stage.metrics({"truncated_rate": report.truncated_rate, "contamination_rate": report.contamination_rate,
                   "duplicate_rate": report.duplicate_rate})
    stage.json(report, "data_report.json")
    stage.artifacts(stage.out / "length_histogram.png")
    if not report.passed:
        raise DataCheckError("data checks failed:\n  " + "\n  ".join(report.problems))
    stage.log.info(f"data checks passed: prompt tokens {report.prompt_tokens}, contamination "
                   f"{report.contamination_rate:.1%}, truncated {report.truncated_rate:.1%}")
    write_text(stage.out / "data_report.json", report.model_dump_json(indent=2))
    return report


@stage("check_drift", params=lambda checks, registry, data: {"data.md5": data.md5,
                                                            "registry.model_name": registry.model_name})
def check_drift(checks: DataChecksSpec, registry: RegistrySpec, data: DatasetRef,
                stage: StageRun) -> DriftReport | NotMeasured:
    """Never cached: the reference is whatever the champion is now (gauntlet/data/drift.py). Not measured: why
    (a warning, and in the run's summary, when the champion's data exists but could not be had)."""
    found = champion_training_file(stage.client, registry, data, gauntlet_home() / "drift-references")
    if isinstance(found, NotMeasured):
        (stage.log.warning if found.warning else stage.log.info)(f"drift not measured: {found.reason}")
        stage.tag("drift", "not measured: " + found.reason)
        return found
    reference_path, reference = found
    report = compare_drift(read_rows(reference_path), read_rows(data.train_path), checks, reference)
    stage.metrics(report.psi, prefix="psi.")
    stage.metrics(report.ks, prefix="ks.")
    stage.metrics({"row_change": report.row_change, "overlap": report.overlap})
    stage.json(report, "drift_report.json")
    if not report.passed:
        raise DataCheckError("data drift against the champion's training data:\n  " + "\n  ".join(report.problems))
    stage.log.info(f"drift against {reference}: PSI {report.psi}, rows {report.rows}, overlap {report.overlap:.0%}")
    return report
