"""Training checkpoints in the shared store, so a training another host started resumes here.

While the trainer runs, :class:`CheckpointUploader` sends each checkpoint it finishes
(``checkpoints/step-NNNNNNNN/``, renamed into place whole by the trainer) to the train stage's MLflow run as the
artifact folder ``checkpoints/step-NNNNNNNN`` and tags the run with the newest one. Before a training starts,
:func:`restore_latest` looks for the newest uploaded checkpoint of the same stage key (any attempt, any host) and
brings it into the local output folder, where the trainer resumes from its newest checkpoint as always. Used only
with a shared MLflow; on one machine the local folder is the store. No Prefect here.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gauntlet.receipts import KEY_TAG

log = logging.getLogger(__name__)

FOLDER = "checkpoints"                 # the trainer's folder in the output folder, and the artifact folder
NEWEST_TAG = "gauntlet.checkpoint"     # the stage run's newest uploaded checkpoint, e.g. step-00000040


def _finished(out: Path) -> list[Path]:
    root = out / FOLDER
    return sorted(p for p in root.glob("step-*") if p.is_dir() and "." not in p.name) if root.is_dir() else []


def _step(name: str) -> int:
    return int(name.removeprefix("step-"))


class CheckpointUploader:
    """Uploads every finished checkpoint of ``out`` to ``run_id`` while training runs (a thread polling every
    ``every_s``); ``stop()`` uploads what is left and returns the names uploaded."""

    def __init__(self, c: Any, run_id: str, out: Path, every_s: float = 1.0, echo: Callable[[str], None] = log.info):
        self.c, self.run_id, self.out, self.every_s, self.echo = c, run_id, Path(out), every_s, echo
        self.uploaded: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="checkpoint-uploader", daemon=True)

    def __enter__(self) -> CheckpointUploader:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        self._sweep()
        return self.uploaded

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sweep()

    def _sweep(self) -> None:
        for folder in _finished(self.out):
            if folder.name in self.uploaded:
                continue
            try:
                self._upload(folder)
            except FileNotFoundError:   # rotated away (checkpoint_keep) before it was read: a newer one follows
                continue
            except Exception as e:     # the store is away for a moment: the next sweep tries again
                log.warning("checkpoint %s not uploaded yet (%s: %s)", folder.name, type(e).__name__, e)
                return

    def _upload(self, folder: Path) -> None:
        # a copy of links first: the trainer may remove an old checkpoint while it is being sent
        with tempfile.TemporaryDirectory(dir=self.out) as tmp:
            staged = Path(tmp) / folder.name
            shutil.copytree(folder, staged, copy_function=os.link)
            self.c.log_artifacts(self.run_id, str(staged), f"{FOLDER}/{folder.name}")
        self.uploaded.append(folder.name)
        if _step(folder.name) >= max(_step(n) for n in self.uploaded):
            self.c.set_tag(self.run_id, NEWEST_TAG, folder.name)
        self.echo(f"checkpoint {folder.name} uploaded to the store (MLflow run {self.run_id})")


def newest_uploaded(c: Any, experiment_ids: list[str], key: str) -> tuple[str, str] | None:
    """(run id, checkpoint name) of the newest checkpoint any attempt of this train stage key uploaded."""
    runs = c.search_runs(experiment_ids, f"tags.`{KEY_TAG}` = '{key}'", max_results=100)
    found = [(_step(r.data.tags[NEWEST_TAG]), r.info.run_id, r.data.tags[NEWEST_TAG])
             for r in runs if r.data.tags.get(NEWEST_TAG)]
    if not found:
        return None
    _, run_id, name = max(found)
    return run_id, name


def restore_latest(c: Any, experiment_ids: list[str], key: str, out: Path,
                   echo: Callable[[str], None] = log.info) -> str | None:
    """Bring the newest uploaded checkpoint of ``key`` into ``out`` unless a checkpoint as new is already here;
    the name of the checkpoint the trainer will resume from (None: it starts at step 0)."""
    local = _finished(Path(out))
    newest = newest_uploaded(c, experiment_ids, key)
    if newest is None or (local and _step(local[-1].name) >= _step(newest[1])):
        return local[-1].name if local else None
    run_id, name = newest
    target = Path(out) / FOLDER / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        got = Path(c.download_artifacts(run_id, f"{FOLDER}/{name}", tmp))
        shutil.rmtree(target, ignore_errors=True)
        got.rename(target)
    echo(f"restored checkpoint {name} from the store (uploaded by MLflow run {run_id})")
    return name
