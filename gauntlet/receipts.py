"""Stage receipts: what a cached stage computed and where its files are, found by its key from every host.

A receipt names the stage's outputs and holds its result as JSON. It is always written as ``receipt.json`` in
the stage's folder (``$GAUNTLET_HOME/stages/<stage>/<key>/``). With a shared MLflow (a server or a database: a
team's pool) that file is only this host's copy: the receipt, and every output inside the stage folder, are
artifacts of the stage's MLflow run (``receipt.json``, ``outputs/…``), and the run is tagged with the stage key.
Another host finds the receipt by the key (:func:`find`), fetches the files into its own stage folder
(:func:`fetch`, each checked against the sha256 the receipt records) and keeps them there. Outputs outside the
stage folder (the files a DVC pull wrote, a local model folder) belong to the stage's inputs: a host that lacks
them computes the stage again. No Prefect here; the MLflow client is passed in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from gauntlet.files import write_json

log = logging.getLogger(__name__)

RECEIPT = "receipt.json"
KEY_TAG = "gauntlet.stage_key"
STORED_TAG = "gauntlet.receipt"       # "stored" once the receipt and its files are all uploaded
OUTPUTS = "outputs"                   # artifact folder of a stage run's outputs


class Receipt(BaseModel):
    stage: str
    outputs: list[str]                      # absolute paths, as the writing host had them
    token: str
    result: Any = None                      # the stage's result as JSON
    with_result: bool = False               # False: JSON cannot hold the result (a waiting run computes its own)
    folder: str | None = None               # the writing host's stage folder (paths inside it are rebased)
    run_id: str | None = None               # the stage run whose artifacts hold the stored outputs
    files: dict[str, str] = {}              # stored file (relative to the folder) -> sha256


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _inside(path: Path, folder: Path) -> str | None:
    try:
        return Path(path).resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return None


def stored_files(outputs: list[str], folder: Path) -> dict[str, str]:
    """sha256 of every file under the outputs that lie inside ``folder`` (those another host fetches)."""
    files: dict[str, str] = {}
    for out in outputs:
        if _inside(Path(out), folder) is None:
            continue
        paths = [Path(out)] if Path(out).is_file() else sorted(p for p in Path(out).rglob("*") if p.is_file())
        for p in paths:
            files[_inside(p, folder)] = _sha256(p)   # type: ignore[index]
    return files


def rebase(value: Any, old: str | None, new: Path) -> Any:
    """``value`` (JSON) with every path under the writer's folder ``old`` moved under ``new``."""
    if not old or old == str(new):
        return value
    if isinstance(value, str):
        return str(new) + value[len(old):] if value == old or value.startswith(old + "/") else value
    if isinstance(value, list):
        return [rebase(v, old, new) for v in value]
    if isinstance(value, dict):
        return {k: rebase(v, old, new) for k, v in value.items()}
    return value


def read_local(folder: Path) -> tuple[Receipt | None, str | None]:
    """(receipt, None) when this host's copy is readable and every file it names exists; (None, why) else."""
    path = folder / RECEIPT
    try:
        receipt = Receipt.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None, "no receipt"
    except (OSError, ValueError) as e:
        return None, f"receipt {path} is unreadable ({type(e).__name__}: {e})"
    missing = [p for p in receipt.outputs if not Path(p).exists()]
    if missing:
        return None, f"receipt {path} names {len(missing)} missing files ({missing[0]}, …)"
    return receipt, None


def write(receipt: Receipt, folder: Path, c: Any = None) -> None:
    """This host's copy, then (``c``: a shared MLflow) the stored outputs and the receipt as the stage run's
    artifacts; the run is tagged ``stored`` last, so a receipt that is found has all its files."""
    if c is not None and receipt.run_id:
        receipt = receipt.model_copy(update={"folder": str(folder), "files": stored_files(receipt.outputs, folder)})
        for out in receipt.outputs:
            rel = _inside(Path(out), folder)
            if rel is None:
                continue
            if Path(out).is_dir():
                c.log_artifacts(receipt.run_id, out, f"{OUTPUTS}/{rel}")
            else:
                parent = str(Path(rel).parent)
                c.log_artifact(receipt.run_id, out, OUTPUTS if parent == "." else f"{OUTPUTS}/{parent}")
        c.log_text(receipt.run_id, receipt.model_dump_json(indent=2), RECEIPT)
        c.set_tag(receipt.run_id, STORED_TAG, "stored")
    write_json(folder / RECEIPT, json.loads(receipt.model_dump_json()))


def find(c: Any, stage: str, key: str) -> Receipt | None:
    """The newest stored receipt of this stage key on the shared MLflow, from any host; None if there is none."""
    experiments = [e.experiment_id for e in c.search_experiments()]
    runs = c.search_runs(experiments, f"tags.`{KEY_TAG}` = '{key}' and tags.`{STORED_TAG}` = 'stored'",
                         order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    if not runs:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = c.download_artifacts(runs[0].info.run_id, RECEIPT, tmp)
        receipt = Receipt.model_validate_json(Path(path).read_text())
    if receipt.stage != stage:
        return None
    return receipt


def _this_hosts(path: str) -> bool:
    """A path inside this host's project or state folder, that exists: an input's file this host has itself."""
    from gauntlet.project import ProjectError, project_root
    from gauntlet.state import gauntlet_home

    roots = [gauntlet_home()]
    with contextlib.suppress(ProjectError):
        roots.append(project_root())
    return Path(path).exists() and any(_inside(Path(path), r) is not None for r in roots)


def fetch(c: Any, receipt: Receipt, folder: Path, echo: Callable[[str], None] = log.info) -> Receipt | None:
    """Bring the stored outputs of another host's ``receipt`` into this host's ``folder`` (files already there
    with the right sha256 are kept) and return the receipt as this host sees it: paths rebased, written as this
    host's copy. None when an output outside the stage folder (the inputs' own files: a DVC pull's data, a local
    model) is not this host's: the stage is computed here. Raises OSError when a stored file is gone from the
    store or arrives damaged."""
    external = [p for p in receipt.outputs if receipt.folder is None or _inside(Path(p), Path(receipt.folder)) is None]
    foreign = [p for p in external if not _this_hosts(p)]
    if foreign:
        echo(f"stage {receipt.stage} was computed on another host, but its output {foreign[0]} lies outside its stage "
             "folder (an input's own file, not in the store): computing it here")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {rel: sha for rel, sha in receipt.files.items()
              if not ((folder / rel).is_file() and _sha256(folder / rel) == sha)}
    if wanted:
        echo(f"fetching {len(wanted)} file(s) of stage {receipt.stage} from the store (MLflow run {receipt.run_id})")
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            for rel, sha in wanted.items():
                got = Path(c.download_artifacts(receipt.run_id, f"{OUTPUTS}/{rel}", tmp))
                if _sha256(got) != sha:
                    raise OSError(f"{rel} of stage {receipt.stage} arrived with another sha256 than its receipt's")
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(got), folder / rel)
    local = receipt.model_copy(update={"outputs": rebase(receipt.outputs, receipt.folder, folder),
                                       "result": rebase(receipt.result, receipt.folder, folder), "folder": str(folder)})
    write_json(folder / RECEIPT, json.loads(local.model_dump_json()))
    return local
