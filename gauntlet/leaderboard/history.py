"""Past nights, from MLflow: every night's ``leaderboard.json`` is an artifact of a FINISHED run tagged
``gauntlet.leaderboard=<name>``, so deltas and trends survive restarts of everything but the tracking store.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from gauntlet.leaderboard.board import Leaderboard
from gauntlet.tracking import client

log = logging.getLogger(__name__)

BOARD_TAG = "gauntlet.leaderboard"


def load_history(tracking_uri: str, experiment: str, name: str, limit: int,
                 exclude_run_id: str | None = None) -> list[Leaderboard]:
    """Previous nights' boards, newest first, from the leaderboard.json of FINISHED runs tagged with ``name``."""
    from mlflow.artifacts import download_artifacts

    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id],
                         filter_string=f"tags.`{BOARD_TAG}` = '{name}' and attributes.status = 'FINISHED'",
                         order_by=["attributes.start_time DESC"], max_results=limit + 1)
    boards: list[Leaderboard] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            if r.info.run_id == exclude_run_id:
                continue
            try:
                path = download_artifacts(run_id=r.info.run_id, artifact_path="leaderboard.json",
                                          dst_path=str(Path(tmp) / r.info.run_id), tracking_uri=tracking_uri)
                boards.append(Leaderboard.model_validate_json(Path(path).read_text()))
            except Exception as e:  # a night without a readable board is skipped, loudly
                log.warning("leaderboard history: run %s has no readable leaderboard.json (%s)", r.info.run_id, e)
    boards.sort(key=lambda b: b.night, reverse=True)
    return boards[:limit]
