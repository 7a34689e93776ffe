"""A registered version's evaluation: its report (per-item records, protocol) kept with the version.

The registry's score tags hold point estimates; a paired comparison with the champion needs the items
it answered and how it was measured. The report is logged to the version's MLflow run as
``eval/report.json`` when the version is registered (again on a re-evaluation of the same files), and read
back by the gate and by a re-gate under the registry lock.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from gauntlet.refs import EvalReport

log = logging.getLogger(__name__)

REPORT_ARTIFACT = "eval/report.json"


def log_version_report(c, run_id: str, report: EvalReport) -> None:
    """Keep ``report`` with the version registered from ``run_id`` (replacing an earlier one)."""
    c.log_text(run_id, report.model_dump_json(), REPORT_ARTIFACT)


def version_report(c, model_name: str, version: str | None) -> EvalReport | None:
    """The evaluation kept with a version, or None (no version, or registered before reports were kept)."""
    from mlflow.exceptions import MlflowException

    if version is None:
        return None
    try:
        mv = c.get_model_version(model_name, version)
        if not mv.run_id:
            return None
        with tempfile.TemporaryDirectory(prefix="gauntlet-report-") as tmp:
            path = Path(c.download_artifacts(mv.run_id, REPORT_ARTIFACT, tmp))
            return EvalReport.model_validate_json(path.read_text(encoding="utf-8"))
    except (MlflowException, OSError, ValueError) as e:
        log.info("%s v%s: no evaluation report kept with it (%s): point estimates only", model_name, version,
                 type(e).__name__)
        return None
