"""The package as users install it: a wheel built from the checkout's files holds one top-level package,
``gauntlet`` (tasks and flows inside it), every module, and the ``gauntlet`` command. Integration tier: it builds
a wheel (seconds of pip), which the unit tier does not."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.helpers import REPO


def sources(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_wheel_installs_one_package_named_gauntlet(tmp_path: Path) -> None:
    # built from a copy of the checkout's files: a build/ folder left by an earlier build must not leak in
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    source = tmp_path / "source"
    for rel in files:
        if (REPO / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, source / rel)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"gauntlet"}, top                       # no `tasks`, no `flows` on sys.path
    expected = {f"gauntlet/{p.relative_to(REPO / 'gauntlet').as_posix()}" for p in sources("gauntlet")}
    expected |= {f"gauntlet/{folder}/{p.relative_to(REPO / folder).as_posix()}" for folder in ("tasks", "flows")
                 for p in sources(folder)}
    assert expected <= set(names), sorted(expected - set(names))   # every module, subpackages included
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "gauntlet = gauntlet.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
