"""The submit flow: a model queued for a board's next leaderboard night, as ``gauntlet submit`` queues it, from the
Prefect UI's run form (deployment ``submit/manual``).

Composition only, and one step: the checks (sources.allow, a pinned revision, config.json and tokenizer load, the GPU
class) and the record in the board's tracking store are ``gauntlet.leaderboard.submissions.submit``'s, which the
command calls too. It keeps no MLflow run of its own: the submission's run is its record. A refused submission is
recorded, and fails this flow run with its reasons and their fixes, so the form's user sees them.
"""

from __future__ import annotations

from prefect import flow

from gauntlet.config.load import load_leaderboard_spec
from gauntlet.leaderboard import submissions
from gauntlet.leaderboard.submission_checks import refusal_text
from gauntlet.project import project_root


class SubmissionRefused(ValueError):
    """A submission refused before it queued: the message names each check's reason and its fix."""


@flow(name="submit", log_prints=True)
def submit(source: str, config: str = "configs/leaderboard.yaml", name: str | None = None,
           submitter: str | None = None) -> submissions.Submission:
    """Check a model and queue it for a board's next leaderboard night, which evaluates it within 24 hours.

    source: a local folder saved with save_pretrained() (pinned by its content sha256), hf://org/name@<commit sha>,
        models:/NAME/VERSION or demo://NAME.
    config: the board: its leaderboard config (a path relative to the project root) or the board's name.
    name: its name on the board (default: from the source).
    submitter: who submits (default: $GAUNTLET_USER, else the worker's login name).
    """
    path = submissions.board_config(config, project_root())
    spec = load_leaderboard_spec(path)
    sub = submissions.submit(spec, source, name=name, by=submitter, config=str(path))
    if sub.state == "refused":
        raise SubmissionRefused(f"{sub.name} refused for board {spec.name}: " + refusal_text(sub.problems))
    print(f"queued: {sub.name} for board {spec.name} ({sub.source}), GPU class {sub.gpu_class}; submitted by "
          f"{sub.submitter}, promised by {sub.deadline:%Y-%m-%d %H:%M} UTC")
    return sub
