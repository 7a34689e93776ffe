"""Files and folders Gauntlet writes: written whole or not at all, their size on disk, and the marker that
says a folder was finished.

Every file another process may read (receipts, reports, results, the leaderboard, training arguments) is
written through :func:`write_text` / :func:`write_json`: into a temporary file in the same folder, flushed,
then ``os.replace``d over the old one. A process killed mid-write leaves the previous good file (and a stray
``.tmp-*`` file), never a truncated one. Folders built for a shared cache (downloads, the demo model) are
built in a folder of their own per process (:func:`partial_dir`) and renamed into place (:func:`publish_dir`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

COMPLETE_MARKER = ".gauntlet-complete"    # sha256_dir leaves it out, so marking never changes a hash


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a reader sees the old content or the new, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)   # mkstemp makes 0600; these files are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path | str, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj: Any, indent: int | None = 2, **dumps: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, **dumps) + ("\n" if indent is not None else ""))


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (``stat`` follows the hub cache's symlinks)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mark_complete(path: Path) -> None:
    write_text(Path(path) / COMPLETE_MARKER, "ok\n")


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).exists()


def partial_dir(target: Path) -> Path:
    """A new, empty folder beside ``target`` for this process alone to build it in (two processes that build
    the same thing never write into one folder)."""
    target = Path(target)
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(built: Path, target: Path) -> Path:
    """Mark ``built`` complete and rename it to ``target``. If another process published ``target`` first,
    its copy stands and ours is dropped; an unfinished ``target`` (no marker) is replaced."""
    from filelock import FileLock

    built, target = Path(built), Path(target)
    mark_complete(built)
    with FileLock(str(target.with_name(target.name + ".lock"))):
        if is_complete(target):
            shutil.rmtree(built, ignore_errors=True)
            return target
        shutil.rmtree(target, ignore_errors=True)
        os.rename(built, target)
    return target
