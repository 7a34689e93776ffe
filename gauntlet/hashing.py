"""Content hashes: of JSON-able values, of files, of whole folders."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def sha256_json(obj: object) -> str:
    """Stable hash of a JSON-able object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _update_with_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def sha256_files(paths: list[Path]) -> str:
    """Hash of the files' names and bytes, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        _update_with_file(h, path)
    return h.hexdigest()


def sha256_dir(root: Path, ignore: tuple[str, ...] = ("README.md", ".gauntlet-complete")) -> str:
    """Content hash of a directory tree: relative names and bytes of every file."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in ignore):
        h.update(str(path.relative_to(root)).encode())
        _update_with_file(h, path)
    return h.hexdigest()
