"""A stage's code version follows the modules it imports, found from the imports (gauntlet/code_version.py).

Edits are made to a copy of the package (``SourceTree.at``), never to the checkout.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gauntlet.code_version import SourceTree, code_version, module_closure
from tests.helpers import REPO

TRAIN_STAGE = "gauntlet.tasks.train"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    for folder in ("gauntlet", "tasks", "flows"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def version(checkout: Path, module: str = TRAIN_STAGE) -> str:
    return code_version(module, SourceTree.at(checkout))


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def test_the_closure_is_what_the_stage_imports_and_nothing_else(checkout: Path) -> None:
    closure = module_closure(TRAIN_STAGE, SourceTree.at(checkout))
    # the program it launches, the library it calls, the stage machinery, and the packages they sit in
    assert {"gauntlet.programs.trainer", "gauntlet.programs.train_kit", "gauntlet.training", "gauntlet.plan.memory",
            "gauntlet.data.sft",
            "gauntlet.tasks._stage", "gauntlet.tasks", "gauntlet"} <= set(closure)
    # modules the training stage never imports
    assert not {"gauntlet.leaderboard.html", "gauntlet.eval.engine", "gauntlet.registry.store",
                "gauntlet.tasks.evaluate", "gauntlet.cli"} & set(closure)
    # one evaluation task's score does not depend on the speed probe, the report on both
    assert "gauntlet.eval.speed" not in module_closure("gauntlet.tasks.score", SourceTree.at(checkout))
    assert {"gauntlet.tasks.score", "gauntlet.tasks.speed_probe"} <= set(
        module_closure("gauntlet.tasks.evaluate", SourceTree.at(checkout)))


def test_editing_a_module_the_stage_does_not_import_leaves_its_key(checkout: Path) -> None:
    before = version(checkout)
    html = checkout / "gauntlet" / "leaderboard" / "html.py"
    edit(html, "from html import escape", "# a comment a stage never sees\nfrom html import escape")
    assert version(checkout) == before
    edit(html, "PALETTE = (", "UNUSED = 1\nPALETTE = (")      # code, too: not the training stage's
    assert version(checkout) == before


def test_editing_the_trainer_changes_the_training_key(checkout: Path) -> None:
    trainer = checkout / "gauntlet" / "programs" / "trainer.py"
    before = version(checkout)
    edit(trainer, '"""The training program:', '"""Reworded docstring. The training program:')
    edit(trainer, "class EpochShuffle", "# a comment\nclass EpochShuffle")
    assert version(checkout) == before                        # comments and docstrings never re-train
    edit(trainer, 'set_seed(spec.seed)', 'set_seed(spec.seed + 1)')
    assert version(checkout) != before


def test_a_type_checking_import_is_not_a_dependency(checkout: Path) -> None:
    stage = checkout / "tasks" / "train.py"
    edit(stage, "from __future__ import annotations\n",
         "from __future__ import annotations\n\nfrom typing import TYPE_CHECKING\n\n"
         "if TYPE_CHECKING:\n    from gauntlet.leaderboard.html import render_html  # noqa: F401\n")
    assert "gauntlet.leaderboard.html" not in module_closure(TRAIN_STAGE, SourceTree.at(checkout))


def test_a_module_outside_the_package_is_refused() -> None:
    with pytest.raises(ValueError, match="not a module of the gauntlet package"):
        code_version("tasks.train")    # the stage imported by a path, not as gauntlet.tasks.train
