"""Stage ``check_data``: duplicates, token lengths and contamination, before any training.

Key: the ``data.checks`` section, ``train.max_seq_len``, the data version and the model's content hash
(its tokenizer measures the lengths). A failed check fails the run here, naming each problem.
"""

from __future__ import annotations

from gauntlet.config.data import DataChecksSpec
from gauntlet.data.checks import DataCheckError, DataReport, check_data as run_checks
from gauntlet.files import write_text
from gauntlet.refs import DatasetRef, ModelRef
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
