"""Disk hygiene: free stage outputs, checkpoints, Prefect results and cached models nobody needs.

Kept: what a registered version points at (its ``model.path`` tag), what any run used within
``keep_days`` (a stage folder's receipt is touched on every cache hit), and anything whose age is
unknown. Removing a stage folder is always safe for correctness: its Prefect cache entry is then
refreshed on the next run (the stage sees its receipt gone) and recomputed.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pydantic import BaseModel

from gauntlet.files import size_on_disk
from gauntlet.state import gauntlet_home


class GcItem(BaseModel):
    path: str
    bytes: int
    reason: str


class GcPlan(BaseModel):
    remove: list[GcItem]
    keep: list[GcItem]

    @property
    def freed_bytes(self) -> int:
        return sum(i.bytes for i in self.remove)


def _last_used(path: Path) -> float:
    receipt = path / "receipt.json"
    return (receipt if receipt.exists() else path).stat().st_mtime


def registered_paths(tracking_uri: str | None) -> set[Path]:
    """Folders that registered model versions were built from (their ``model.path`` tags)."""
    from gauntlet import tracking

    # the one client: a sqlite store is set up under its lock, like every other command's
    c = tracking.client(tracking.tracking_uri(tracking_uri))
    paths: set[Path] = set()
    for model in c.search_registered_models():
        for version in c.search_model_versions(f"name='{model.name}'"):
            if "model.path" in version.tags:
                paths.add(Path(version.tags["model.path"]).resolve())
    return paths


def plan_gc(keep_days: float = 7.0, tracking_uri: str | None = None, home: Path | None = None) -> GcPlan:
    home = home or gauntlet_home()
    cutoff = time.time() - keep_days * 86400
    protected = registered_paths(tracking_uri)
    remove, keep = [], []
    stage_dirs = sorted(p for p in (home / "stages").glob("*/*") if p.is_dir())
    removed_keys: set[str] = set()
    for d in stage_dirs:
        size = size_on_disk(d)
        if any(p == d or d in p.parents for p in protected):
            keep.append(GcItem(path=str(d), bytes=size, reason="a registered model version was built from it"))
        elif _last_used(d) >= cutoff:
            keep.append(GcItem(path=str(d), bytes=size, reason=f"used within {keep_days:g} days"))
        else:
            remove.append(GcItem(path=str(d), bytes=size, reason=f"not used for {keep_days:g}+ days"))
            removed_keys.add(f"{d.parent.name}-{d.name}")
    # Prefect result records are named "<stage>-<full key>"; stage folders "<stage>/<key[:16]>".
    for record in sorted((home / "prefect" / "results").glob("*")):
        stage, _, key = record.name.rpartition("-")
        if record.is_file() and f"{stage}-{key[:16]}" in removed_keys:
            remove.append(GcItem(path=str(record), bytes=record.stat().st_size,
                                 reason="Prefect cache record of a removed stage output"))
    for model in sorted(p for p in (home / "models").glob("*/*") if p.is_dir()):
        if model.stat().st_mtime < cutoff:
            remove.append(GcItem(path=str(model), bytes=size_on_disk(model), reason="cached model unused (re-fetched on demand)"))
    return GcPlan(remove=remove, keep=keep)


def apply_gc(plan: GcPlan, reason: str = "gauntlet gc") -> int:
    """Remove what ``plan`` lists; the removal is recorded in the audit log (what, how much, why)."""
    if plan.remove:
        from gauntlet.audit import record

        record("gc", f"{len(plan.remove)} item(s), {plan.freed_bytes / 1e6:.1f} MB", reason,
               freed_bytes=plan.freed_bytes, paths=[i.path for i in plan.remove][:200])
    for item in plan.remove:
        path = Path(item.path)
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return plan.freed_bytes
