"""Folders Gauntlet writes: their size on disk, and the marker that says one was finished."""

from __future__ import annotations

from pathlib import Path

COMPLETE_MARKER = ".gauntlet-complete"    # sha256_dir leaves it out, so marking never changes a hash


def size_on_disk(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (``stat`` follows the hub cache's symlinks)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mark_complete(path: Path) -> None:
    (path / COMPLETE_MARKER).write_text("ok\n")


def is_complete(path: Path) -> bool:
    return (path / COMPLETE_MARKER).exists()
