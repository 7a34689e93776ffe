"""Where the user's project is: the folder whose configs, data, ``evals/``, ``dvc.yaml`` and deployment
profiles a command works on.

Found from the working directory upward, as git and DVC find theirs: the nearest folder holding both
``dvc.yaml`` and ``configs/`` (``$GAUNTLET_PROJECT_ROOT`` names it outright, e.g. in a container).
The code comes from wherever the ``gauntlet`` package was installed. When that is another clone of
this repository than the one the user stands in, code and files would silently come from two places:
:func:`project_root` refuses, naming both checkouts and the fix.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

ROOT_ENV = "GAUNTLET_PROJECT_ROOT"
DISTRIBUTION = "llm-gauntlet"


class ProjectError(RuntimeError):
    """No project here, or the installed gauntlet belongs to another checkout; the message says what to do."""


def is_project(folder: Path) -> bool:
    return (folder / "dvc.yaml").is_file() and (folder / "configs").is_dir()


def find_root(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` that is a project, or None."""
    start = start.resolve()
    return next((p for p in (start, *start.parents) if is_project(p)), None)


def is_gauntlet_checkout(folder: Path) -> bool:
    """A clone of this repository (rather than a user's own project)."""
    try:
        text = (folder / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    return f'name = "{DISTRIBUTION}"' in text


def installed_checkout() -> Path | None:
    """The checkout the running ``gauntlet`` package comes from (an editable install); None for a wheel."""
    folder = Path(__file__).resolve().parent.parent
    return folder if is_gauntlet_checkout(folder) else None


def check_checkout(root: Path, installed: Path | None) -> None:
    """ProjectError when ``root`` is a gauntlet checkout other than ``installed``, the one this gauntlet runs
    from (None: installed from a wheel, no checkout to compare with)."""
    if installed is None or not is_gauntlet_checkout(root) or installed.resolve() == root.resolve():
        return
    raise ProjectError(
        f"this gauntlet is installed from the checkout {installed}, but you are working in the checkout {root}: "
        f"its code, flows and stages would come from {installed} while configs, data and evals come from {root}. "
        f"Fix: use {root}'s own environment (`cd {root} && make setup`, then `{root}/.venv/bin/gauntlet`), or "
        f"`pip install -e {root}` into this one.")


@functools.lru_cache(maxsize=8)
def _root_for(cwd: str, env_root: str | None) -> Path:
    if env_root:
        root = Path(env_root).resolve()
        if not is_project(root):
            raise ProjectError(f"${ROOT_ENV}={env_root} is not a Gauntlet project (it needs dvc.yaml and configs/)")
    else:
        found = find_root(Path(cwd))
        if found is None:
            raise ProjectError(
                f"no Gauntlet project at or above {cwd} (a project is a folder with dvc.yaml and configs/). "
                f"Fix: run gauntlet from inside your project, or set ${ROOT_ENV}.")
        root = found
    check_checkout(root, installed_checkout())
    return root


def project_root() -> Path:
    """The project the current command works on (see the module docstring); ProjectError if there is none."""
    return _root_for(os.getcwd(), os.environ.get(ROOT_ENV) or None)


def in_project(path: str | Path) -> Path:
    """``path`` made absolute: relative paths are relative to the project root."""
    p = Path(path)
    return p if p.is_absolute() else project_root() / p
